# Runs one taskrunner request as a Ruby class, CwTaskRunner style: the class
# named on the command line is built with the row's options and its `run`
# returns the result text. A command task type in taskrunner.yml:
#
#   tasks:
#     WordCount:
#       command: [bin/rails, runner, lib/task_runner_task.rb, WordCountTask]
#       workdir: /srv/app           # the Rails app (writable by the daemon's user)
#       env: { RAILS_ENV: production }
#
# Without Rails (plain Ruby, the class file required by hand):
#
#       command: [ruby, -I, app/tasks, -r, word_count_task, lib/task_runner_task.rb, WordCountTask]
#
# The process protocol (README, "Task types"): options arrive as YAML on
# standard input (Ruby's `:symbol:` keys and `!ruby/hash` tags included);
# what `run` returns is printed as the result; an exception exits 1, and its
# message (the first line on standard error) is what `taskrunner-cli list`
# shows. `progress(text)` reports progress (kept in the row's `progress`).
require "yaml"

class_name = ARGV.fetch(0) { abort "usage: task_runner_task.rb CLASS_NAME" }
text = $stdin.read
options =
  if text.strip.empty?
    {}
  elsif YAML.respond_to?(:unsafe_load)
    # Ruby's own tags (`!ruby/hash:ActiveSupport::HashWithIndifferentAccess`)
    # come from the app's own rows: load them as Ruby wrote them.
    YAML.unsafe_load(text)
  else
    YAML.load(text)
  end
options = options.to_h.transform_keys(&:to_s)

begin
  result = Object.const_get(class_name).new(options).run
rescue StandardError => e
  warn "#{e.class}: #{e.message}"
  warn e.backtrace.first(5).join("\n") if e.backtrace
  exit 1
end
puts result unless result.nil?
