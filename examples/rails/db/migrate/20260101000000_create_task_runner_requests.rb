# The taskrunner request table as a Rails migration, for SQLite and
# PostgreSQL (the columns of README.md, "The table").
#
# Copy into db/migrate/ of a Rails app. taskrunner's own migration
# (`taskrunner-cli migrate`, or taskrunnerd at start) then finds the table and
# only adds what ActiveRecord cannot express: the partial indexes, the
# timestamp-normalising triggers (SQLite) and the NOTIFY trigger that wakes
# daemons at once (PostgreSQL). Its bookkeeping lives in its own table,
# never in schema_migrations.
# Migration[6.1]: runs on ActiveRecord 6.1 (Debian 12's) through 8.x.
class CreateTaskRunnerRequests < ActiveRecord::Migration[6.1]
  def change
    postgres = connection.adapter_name.downcase.include?("postg")
    # PostgreSQL: timestamptz; SQLite: DATETIME holding UTC text.
    time = postgres ? :timestamptz : :datetime
    now = postgres ? -> { "now()" } : -> { "(strftime('%Y-%m-%d %H:%M:%f', 'now'))" }

    create_table :task_runner_requests, id: :bigint do |t|
      t.column :created_at, time, null: false, default: now
      t.text :task_class_name, null: false
      t.text :options                      # YAML; NULL or empty: no options
      t.integer :pid                       # the running try's process; NULL when not running
      t.text :host                         # host_id of the daemon that runs or ran it
      t.column :started_at, time
      t.column :completed_at, time
      t.column :heartbeat_at, time
      t.text :result                       # NULL, RUNNING, FINISHED, FAILED, CRASHED, TIMEOUT, INTERRUPTED, CANCELLED, REJECTED
      t.text :result_text
      t.integer :tries, null: false, default: 0
      t.integer :try_limit, null: false, default: 5
      t.column :delay_until, time          # not run before this time
      t.integer :priority, null: false, default: 0
      # Written by taskrunner only: fencing, process identity, cancel, progress.
      t.text :claim_token
      t.text :claimed_by
      t.text :pid_boot_id
      t.bigint :pid_start_ticks
      t.column :cancel_requested_at, time
      t.text :progress
    end
  end
end
