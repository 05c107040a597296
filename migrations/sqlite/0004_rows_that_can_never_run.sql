-- Rows an application could insert that can never run nor end are refused
-- with an error naming the rule (issue 13): a try_limit below 1, a row
-- never run with no try left (tries >= try_limit, result NULL), a result
-- that is not a state (an empty string included), a task type name longer
-- than 255 characters, a time SQLite cannot read ('tomorrow').
--
-- Triggers, not CHECK constraints: SQLite adds a CHECK only by rebuilding
-- the table, and a trigger lets an UPDATE check only what it changes, so
-- that a row written before this migration can still be cancelled, retried
-- or claimed (the daemon never writes what these rules refuse).
-- `taskrunner-cli list` flags the rows written before it that break a rule.
CREATE TRIGGER IF NOT EXISTS task_runner_requests_check_insert
BEFORE INSERT ON task_runner_requests
BEGIN
    SELECT RAISE(ABORT, 'task_runner_requests: try_limit must be at least 1')
     WHERE NEW.try_limit < 1;
    SELECT RAISE(ABORT, 'task_runner_requests: a row never run (result NULL) needs tries < try_limit')
     WHERE NEW.result IS NULL AND NEW.tries >= NEW.try_limit;
    SELECT RAISE(ABORT, 'task_runner_requests: result must be NULL or one of RUNNING, FINISHED, FAILED, CRASHED, TIMEOUT, INTERRUPTED, CANCELLED, REJECTED')
     WHERE NEW.result IS NOT NULL
       AND NEW.result NOT IN ('RUNNING', 'FINISHED', 'FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED', 'CANCELLED', 'REJECTED');
    SELECT RAISE(ABORT, 'task_runner_requests: task_class_name is longer than 255 characters')
     WHERE length(NEW.task_class_name) > 255;
    SELECT RAISE(ABORT, 'task_runner_requests: delay_until is not a time (write e.g. 2026-11-24 07:00:00 or 2026-11-24T07:00:00Z)')
     WHERE NEW.delay_until IS NOT NULL AND strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until) IS NULL;
    SELECT RAISE(ABORT, 'task_runner_requests: planned_at is not a time (write e.g. 2026-11-24 07:00:00 or 2026-11-24T07:00:00Z)')
     WHERE NEW.planned_at IS NOT NULL AND strftime('%Y-%m-%d %H:%M:%f', NEW.planned_at) IS NULL;
    SELECT RAISE(ABORT, 'task_runner_requests: created_at is not a time (write e.g. 2026-11-24 07:00:00 or 2026-11-24T07:00:00Z)')
     WHERE NEW.created_at IS NOT NULL AND strftime('%Y-%m-%d %H:%M:%f', NEW.created_at) IS NULL;
END;

CREATE TRIGGER IF NOT EXISTS task_runner_requests_check_update
BEFORE UPDATE OF result, tries, try_limit, task_class_name, delay_until, planned_at
ON task_runner_requests
BEGIN
    SELECT RAISE(ABORT, 'task_runner_requests: try_limit must be at least 1')
     WHERE NEW.try_limit IS NOT OLD.try_limit AND NEW.try_limit < 1;
    SELECT RAISE(ABORT, 'task_runner_requests: a row never run (result NULL) needs tries < try_limit (set tries to 0 to run it again)')
     WHERE (NEW.result IS NOT OLD.result OR NEW.tries IS NOT OLD.tries OR NEW.try_limit IS NOT OLD.try_limit)
       AND NEW.result IS NULL AND NEW.tries >= NEW.try_limit;
    SELECT RAISE(ABORT, 'task_runner_requests: result must be NULL or one of RUNNING, FINISHED, FAILED, CRASHED, TIMEOUT, INTERRUPTED, CANCELLED, REJECTED')
     WHERE NEW.result IS NOT OLD.result AND NEW.result IS NOT NULL
       AND NEW.result NOT IN ('RUNNING', 'FINISHED', 'FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED', 'CANCELLED', 'REJECTED');
    SELECT RAISE(ABORT, 'task_runner_requests: task_class_name is longer than 255 characters')
     WHERE NEW.task_class_name IS NOT OLD.task_class_name AND length(NEW.task_class_name) > 255;
    SELECT RAISE(ABORT, 'task_runner_requests: delay_until is not a time (write e.g. 2026-11-24 07:00:00 or 2026-11-24T07:00:00Z)')
     WHERE NEW.delay_until IS NOT OLD.delay_until AND NEW.delay_until IS NOT NULL
       AND strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until) IS NULL;
    SELECT RAISE(ABORT, 'task_runner_requests: planned_at is not a time (write e.g. 2026-11-24 07:00:00 or 2026-11-24T07:00:00Z)')
     WHERE NEW.planned_at IS NOT OLD.planned_at AND NEW.planned_at IS NOT NULL
       AND strftime('%Y-%m-%d %H:%M:%f', NEW.planned_at) IS NULL;
END;
