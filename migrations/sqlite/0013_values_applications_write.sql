-- More values an application could write that the daemon would read
-- wrongly are refused with an error naming the rule, as migration 0004's
-- are (its two triggers are made again here with the new rules added):
--
-- * tries below 0: each one below gave the row one more try than its
--   try_limit;
-- * a period below 1 second: the row ran once and silently never again
--   (NULL, the default, is the row that is not periodic);
-- * an on_success or on_failure callback name longer than 255 characters,
--   the longest task type name: its callback could not be made, and was
--   dropped with one log line at the row's end (the same for a batch's
--   on_complete and on_failure);
-- * on SQLite, which stores what it is given whatever the column's type, a
--   try_limit, tries, priority or period that is not a whole number: a
--   try_limit of 'abc' compared greater than every number, so a failing
--   row was retried without end; 'high' as a priority ran before every
--   number; a try_limit of 1.5 allowed two tries. (A text of digits, '5',
--   is stored as the number 5 and is accepted.)
--
-- As in 0004, an UPDATE is judged only on what it changes, so rows written
-- before this migration can still be claimed, retried and cancelled.
DROP TRIGGER IF EXISTS task_runner_requests_check_insert;
CREATE TRIGGER task_runner_requests_check_insert
BEFORE INSERT ON task_runner_requests
BEGIN
    SELECT RAISE(ABORT, 'task_runner_requests: try_limit must be a whole number')
     WHERE typeof(NEW.try_limit) <> 'integer';
    SELECT RAISE(ABORT, 'task_runner_requests: try_limit must be at least 1')
     WHERE NEW.try_limit < 1;
    SELECT RAISE(ABORT, 'task_runner_requests: tries must be a whole number, at least 0')
     WHERE typeof(NEW.tries) <> 'integer' OR NEW.tries < 0;
    SELECT RAISE(ABORT, 'task_runner_requests: a row never run (result NULL) needs tries < try_limit')
     WHERE NEW.result IS NULL AND NEW.tries >= NEW.try_limit;
    SELECT RAISE(ABORT, 'task_runner_requests: result must be NULL or one of RUNNING, FINISHED, FAILED, CRASHED, TIMEOUT, INTERRUPTED, CANCELLED, REJECTED')
     WHERE NEW.result IS NOT NULL
       AND NEW.result NOT IN ('RUNNING', 'FINISHED', 'FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED', 'CANCELLED', 'REJECTED');
    SELECT RAISE(ABORT, 'task_runner_requests: priority must be a whole number')
     WHERE typeof(NEW.priority) <> 'integer';
    SELECT RAISE(ABORT, 'task_runner_requests: period must be NULL (not periodic) or a whole number of seconds, at least 1')
     WHERE NEW.period IS NOT NULL AND (typeof(NEW.period) <> 'integer' OR NEW.period < 1);
    SELECT RAISE(ABORT, 'task_runner_requests: task_class_name is longer than 255 characters')
     WHERE length(NEW.task_class_name) > 255;
    SELECT RAISE(ABORT, 'task_runner_requests: on_success is longer than 255 characters, the longest task type name')
     WHERE length(NEW.on_success) > 255;
    SELECT RAISE(ABORT, 'task_runner_requests: on_failure is longer than 255 characters, the longest task type name')
     WHERE length(NEW.on_failure) > 255;
    SELECT RAISE(ABORT, 'task_runner_requests: delay_until is not a time (write e.g. 2026-11-24 07:00:00 or 2026-11-24T07:00:00Z)')
     WHERE NEW.delay_until IS NOT NULL AND strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until) IS NULL;
    SELECT RAISE(ABORT, 'task_runner_requests: planned_at is not a time (write e.g. 2026-11-24 07:00:00 or 2026-11-24T07:00:00Z)')
     WHERE NEW.planned_at IS NOT NULL AND strftime('%Y-%m-%d %H:%M:%f', NEW.planned_at) IS NULL;
    SELECT RAISE(ABORT, 'task_runner_requests: created_at is not a time (write e.g. 2026-11-24 07:00:00 or 2026-11-24T07:00:00Z)')
     WHERE NEW.created_at IS NOT NULL AND strftime('%Y-%m-%d %H:%M:%f', NEW.created_at) IS NULL;
END;

DROP TRIGGER IF EXISTS task_runner_requests_check_update;
CREATE TRIGGER task_runner_requests_check_update
BEFORE UPDATE OF result, tries, try_limit, priority, period, task_class_name, on_success, on_failure,
                 delay_until, planned_at
ON task_runner_requests
BEGIN
    SELECT RAISE(ABORT, 'task_runner_requests: try_limit must be a whole number')
     WHERE NEW.try_limit IS NOT OLD.try_limit AND typeof(NEW.try_limit) <> 'integer';
    SELECT RAISE(ABORT, 'task_runner_requests: try_limit must be at least 1')
     WHERE NEW.try_limit IS NOT OLD.try_limit AND NEW.try_limit < 1;
    SELECT RAISE(ABORT, 'task_runner_requests: tries must be a whole number, at least 0')
     WHERE NEW.tries IS NOT OLD.tries AND (typeof(NEW.tries) <> 'integer' OR NEW.tries < 0);
    SELECT RAISE(ABORT, 'task_runner_requests: a row never run (result NULL) needs tries < try_limit (set tries to 0 to run it again)')
     WHERE (NEW.result IS NOT OLD.result OR NEW.tries IS NOT OLD.tries OR NEW.try_limit IS NOT OLD.try_limit)
       AND NEW.result IS NULL AND NEW.tries >= NEW.try_limit;
    SELECT RAISE(ABORT, 'task_runner_requests: result must be NULL or one of RUNNING, FINISHED, FAILED, CRASHED, TIMEOUT, INTERRUPTED, CANCELLED, REJECTED')
     WHERE NEW.result IS NOT OLD.result AND NEW.result IS NOT NULL
       AND NEW.result NOT IN ('RUNNING', 'FINISHED', 'FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED', 'CANCELLED', 'REJECTED');
    SELECT RAISE(ABORT, 'task_runner_requests: priority must be a whole number')
     WHERE NEW.priority IS NOT OLD.priority AND typeof(NEW.priority) <> 'integer';
    SELECT RAISE(ABORT, 'task_runner_requests: period must be NULL (not periodic) or a whole number of seconds, at least 1')
     WHERE NEW.period IS NOT OLD.period AND NEW.period IS NOT NULL
       AND (typeof(NEW.period) <> 'integer' OR NEW.period < 1);
    SELECT RAISE(ABORT, 'task_runner_requests: task_class_name is longer than 255 characters')
     WHERE NEW.task_class_name IS NOT OLD.task_class_name AND length(NEW.task_class_name) > 255;
    SELECT RAISE(ABORT, 'task_runner_requests: on_success is longer than 255 characters, the longest task type name')
     WHERE NEW.on_success IS NOT OLD.on_success AND length(NEW.on_success) > 255;
    SELECT RAISE(ABORT, 'task_runner_requests: on_failure is longer than 255 characters, the longest task type name')
     WHERE NEW.on_failure IS NOT OLD.on_failure AND length(NEW.on_failure) > 255;
    SELECT RAISE(ABORT, 'task_runner_requests: delay_until is not a time (write e.g. 2026-11-24 07:00:00 or 2026-11-24T07:00:00Z)')
     WHERE NEW.delay_until IS NOT OLD.delay_until AND NEW.delay_until IS NOT NULL
       AND strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until) IS NULL;
    SELECT RAISE(ABORT, 'task_runner_requests: planned_at is not a time (write e.g. 2026-11-24 07:00:00 or 2026-11-24T07:00:00Z)')
     WHERE NEW.planned_at IS NOT OLD.planned_at AND NEW.planned_at IS NOT NULL
       AND strftime('%Y-%m-%d %H:%M:%f', NEW.planned_at) IS NULL;
END;

CREATE TRIGGER IF NOT EXISTS task_runner_batches_check_insert
BEFORE INSERT ON task_runner_batches
BEGIN
    SELECT RAISE(ABORT, 'task_runner_batches: on_complete is longer than 255 characters, the longest task type name')
     WHERE length(NEW.on_complete) > 255;
    SELECT RAISE(ABORT, 'task_runner_batches: on_failure is longer than 255 characters, the longest task type name')
     WHERE length(NEW.on_failure) > 255;
END;

CREATE TRIGGER IF NOT EXISTS task_runner_batches_check_update
BEFORE UPDATE OF on_complete, on_failure ON task_runner_batches
BEGIN
    SELECT RAISE(ABORT, 'task_runner_batches: on_complete is longer than 255 characters, the longest task type name')
     WHERE NEW.on_complete IS NOT OLD.on_complete AND length(NEW.on_complete) > 255;
    SELECT RAISE(ABORT, 'task_runner_batches: on_failure is longer than 255 characters, the longest task type name')
     WHERE NEW.on_failure IS NOT OLD.on_failure AND length(NEW.on_failure) > 255;
END;
