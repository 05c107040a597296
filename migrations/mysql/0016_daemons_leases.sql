-- Each daemon's `lease_timeout`, in milliseconds, written by the daemon into
-- its own row at start and at each heartbeat (a reload may change it).
-- Before, a reaper took another daemon's running row as crashed once its
-- heartbeat was older than the reaper's own `lease_timeout`: a daemon (or
-- `taskrunner-cli reap`) configured with a shorter lease than the daemon
-- holding the row reaped rows whose tasks still ran, between two of their
-- renewals, and they ran again beside themselves. Now a row's lease is the
-- longer of the reaper's and its holder's. NULL (a daemon of an earlier
-- release) leaves the reaper's own.
ALTER TABLE task_runner_daemons ADD COLUMN lease_ms BIGINT;
