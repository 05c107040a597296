-- An application that retries an exhausted row by giving it more tries
-- (`UPDATE … SET try_limit = try_limit + 3`), or by setting its `tries`
-- back, made it runnable without a NOTIFY: the trigger fired only on
-- changes of `result`, `pid`, `delay_until` and `delay_passed_at`, and the
-- row waited for the daemons' next poll (a minute by default). SQLite's
-- daemons notice any commit, MariaDB's the first runnable row changing.
-- The trigger is made again with both columns added.
DROP TRIGGER IF EXISTS task_runner_requests_notify ON task_runner_requests;
CREATE TRIGGER task_runner_requests_notify
AFTER INSERT OR UPDATE OF result, pid, delay_until, delay_passed_at, tries, try_limit
ON task_runner_requests
FOR EACH ROW
WHEN (NEW.pid IS NULL AND (NEW.result IS NULL OR NEW.result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED')))
EXECUTE FUNCTION task_runner_requests_notify();
