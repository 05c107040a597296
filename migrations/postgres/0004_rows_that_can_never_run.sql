-- Rows an application could insert that can never run nor end are refused
-- with an error naming the rule (issue 13): a try_limit below 1, a row
-- never run with no try left (tries >= try_limit, result NULL), a result
-- that is not a state (an empty string included), a task type name longer
-- than 255 characters. (A time PostgreSQL cannot read is refused by the
-- column's type already.)
--
-- A trigger rather than CHECK constraints: a CHECK judges the whole row at
-- every UPDATE, so one row written before this migration (a 1 MB type name,
-- say) would fail every claim that includes it; the trigger judges on
-- UPDATE only what the statement changes, and its WHEN clause keeps the
-- function out of every valid write. Adding it reads no row, at any table
-- size. `taskrunner-cli list` flags the rows written before it that break
-- a rule.
CREATE OR REPLACE FUNCTION task_runner_requests_refuse_impossible() RETURNS trigger AS $$
BEGIN
    IF NEW.try_limit < 1 THEN
        RAISE EXCEPTION 'task_runner_requests: try_limit must be at least 1 (got %)', NEW.try_limit
            USING ERRCODE = 'check_violation';
    ELSIF NEW.result IS NULL AND NEW.tries >= NEW.try_limit THEN
        RAISE EXCEPTION 'task_runner_requests: a row never run (result NULL) needs tries < try_limit (got tries %, try_limit %; set tries to 0 to run it again)', NEW.tries, NEW.try_limit
            USING ERRCODE = 'check_violation';
    ELSIF NEW.result IS NOT NULL
      AND NEW.result NOT IN ('RUNNING', 'FINISHED', 'FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED', 'CANCELLED', 'REJECTED') THEN
        RAISE EXCEPTION 'task_runner_requests: result must be NULL or one of RUNNING, FINISHED, FAILED, CRASHED, TIMEOUT, INTERRUPTED, CANCELLED, REJECTED (got %)', quote_literal(NEW.result)
            USING ERRCODE = 'check_violation';
    ELSIF length(NEW.task_class_name) > 255 THEN
        RAISE EXCEPTION 'task_runner_requests: task_class_name is longer than 255 characters (got %)', length(NEW.task_class_name)
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS task_runner_requests_check_insert ON task_runner_requests;
CREATE TRIGGER task_runner_requests_check_insert
BEFORE INSERT ON task_runner_requests
FOR EACH ROW
WHEN (NEW.try_limit < 1
      OR (NEW.result IS NULL AND NEW.tries >= NEW.try_limit)
      OR NEW.result NOT IN ('RUNNING', 'FINISHED', 'FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED', 'CANCELLED', 'REJECTED')
      OR length(NEW.task_class_name) > 255)
EXECUTE FUNCTION task_runner_requests_refuse_impossible();

DROP TRIGGER IF EXISTS task_runner_requests_check_update ON task_runner_requests;
CREATE TRIGGER task_runner_requests_check_update
BEFORE UPDATE ON task_runner_requests
FOR EACH ROW
WHEN ((NEW.try_limit IS DISTINCT FROM OLD.try_limit AND NEW.try_limit < 1)
      OR ((NEW.result IS DISTINCT FROM OLD.result OR NEW.tries IS DISTINCT FROM OLD.tries
           OR NEW.try_limit IS DISTINCT FROM OLD.try_limit)
          AND NEW.result IS NULL AND NEW.tries >= NEW.try_limit)
      OR (NEW.result IS DISTINCT FROM OLD.result
          AND NEW.result NOT IN ('RUNNING', 'FINISHED', 'FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED', 'CANCELLED', 'REJECTED'))
      OR (NEW.task_class_name IS DISTINCT FROM OLD.task_class_name AND length(NEW.task_class_name) > 255))
EXECUTE FUNCTION task_runner_requests_refuse_impossible();
