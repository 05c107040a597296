# Loads taskrunner's tables into an empty database the way a Rails app's
# test database gets them: ActiveRecord dumps the development database to
# schema.rb (Rails' default schema format), and loads that file into the test
# database (`db:schema:load`, `db:test:prepare`). Triggers, SQL defaults
# and taskrunner's migration records do not survive the trip.
#
#   ruby schema_rb_round_trip.rb FROM_URL TO_URL SCHEMA_RB
#
# URLs as taskrunner writes them: sqlite:///path.db, postgres://… or
# mysql://… (ActiveRecord's MySQL adapter is mysql2).
require "active_record"

def connect(url)
  if url.start_with?("sqlite:")
    ActiveRecord::Base.establish_connection(adapter: "sqlite3", database: url.sub(%r{\Asqlite://}, ""))
  elsif url.start_with?("mysql:", "mariadb:")
    ActiveRecord::Base.establish_connection(url.sub(/\A(mysql|mariadb):/, "mysql2:"))
  else
    ActiveRecord::Base.establish_connection(url)
  end
end

from, to, schema = ARGV
connect(from)
File.open(schema, "w") do |file|
  ActiveRecord::SchemaDumper.dump(ActiveRecord::Base.connection, file)
end
connect(to)
ActiveRecord::Schema.verbose = false
load schema
puts "loaded #{ActiveRecord::Base.connection.tables.sort.join(' ')} with ActiveRecord #{ActiveRecord.version}"
