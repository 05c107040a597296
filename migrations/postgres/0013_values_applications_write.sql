-- More values an application could write that the daemon would read
-- wrongly are refused with an error naming the rule, as migration 0004's
-- are (its function and triggers are made again here with the new rules):
--
-- * tries below 0: each one below gave the row one more try than its
--   try_limit;
-- * a period below 1 second: the row ran once and silently never again
--   (NULL, the default, is the row that is not periodic);
-- * an on_success or on_failure callback name longer than 255 characters,
--   the longest task type name: its callback could not be made, and was
--   dropped with one log line at the row's end (the same for a batch's
--   on_complete and on_failure).
--
-- As in 0004, an UPDATE is judged only on what it changes, so rows written
-- before this migration can still be claimed, retried and cancelled, and
-- the WHEN clauses keep the functions out of every valid write.
CREATE OR REPLACE FUNCTION task_runner_requests_refuse_impossible() RETURNS trigger AS $$
BEGIN
    IF NEW.try_limit < 1 THEN
        RAISE EXCEPTION 'task_runner_requests: try_limit must be at least 1 (got %)', NEW.try_limit
            USING ERRCODE = 'check_violation';
    ELSIF NEW.tries < 0 THEN
        RAISE EXCEPTION 'task_runner_requests: tries must be a whole number, at least 0 (got %)', NEW.tries
            USING ERRCODE = 'check_violation';
    ELSIF NEW.result IS NULL AND NEW.tries >= NEW.try_limit THEN
        RAISE EXCEPTION 'task_runner_requests: a row never run (result NULL) needs tries < try_limit (got tries %, try_limit %; set tries to 0 to run it again)', NEW.tries, NEW.try_limit
            USING ERRCODE = 'check_violation';
    ELSIF NEW.result IS NOT NULL
      AND NEW.result NOT IN ('RUNNING', 'FINISHED', 'FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED', 'CANCELLED', 'REJECTED') THEN
        RAISE EXCEPTION 'task_runner_requests: result must be NULL or one of RUNNING, FINISHED, FAILED, CRASHED, TIMEOUT, INTERRUPTED, CANCELLED, REJECTED (got %)', quote_literal(NEW.result)
            USING ERRCODE = 'check_violation';
    ELSIF NEW.period < 1 THEN
        RAISE EXCEPTION 'task_runner_requests: period must be NULL (not periodic) or a whole number of seconds, at least 1 (got %)', NEW.period
            USING ERRCODE = 'check_violation';
    ELSIF length(NEW.task_class_name) > 255 THEN
        RAISE EXCEPTION 'task_runner_requests: task_class_name is longer than 255 characters (got %)', length(NEW.task_class_name)
            USING ERRCODE = 'check_violation';
    ELSIF length(NEW.on_success) > 255 THEN
        RAISE EXCEPTION 'task_runner_requests: on_success is longer than 255 characters, the longest task type name (got %)', length(NEW.on_success)
            USING ERRCODE = 'check_violation';
    ELSIF length(NEW.on_failure) > 255 THEN
        RAISE EXCEPTION 'task_runner_requests: on_failure is longer than 255 characters, the longest task type name (got %)', length(NEW.on_failure)
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
      OR NEW.tries < 0
      OR (NEW.result IS NULL AND NEW.tries >= NEW.try_limit)
      OR NEW.result NOT IN ('RUNNING', 'FINISHED', 'FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED', 'CANCELLED', 'REJECTED')
      OR NEW.period < 1
      OR length(NEW.task_class_name) > 255
      OR length(NEW.on_success) > 255
      OR length(NEW.on_failure) > 255)
EXECUTE FUNCTION task_runner_requests_refuse_impossible();

DROP TRIGGER IF EXISTS task_runner_requests_check_update ON task_runner_requests;
CREATE TRIGGER task_runner_requests_check_update
BEFORE UPDATE ON task_runner_requests
FOR EACH ROW
WHEN ((NEW.try_limit IS DISTINCT FROM OLD.try_limit AND NEW.try_limit < 1)
      OR (NEW.tries IS DISTINCT FROM OLD.tries AND NEW.tries < 0)
      OR ((NEW.result IS DISTINCT FROM OLD.result OR NEW.tries IS DISTINCT FROM OLD.tries
           OR NEW.try_limit IS DISTINCT FROM OLD.try_limit)
          AND NEW.result IS NULL AND NEW.tries >= NEW.try_limit)
      OR (NEW.result IS DISTINCT FROM OLD.result
          AND NEW.result NOT IN ('RUNNING', 'FINISHED', 'FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED', 'CANCELLED', 'REJECTED'))
      OR (NEW.period IS DISTINCT FROM OLD.period AND NEW.period < 1)
      OR (NEW.task_class_name IS DISTINCT FROM OLD.task_class_name AND length(NEW.task_class_name) > 255)
      OR (NEW.on_success IS DISTINCT FROM OLD.on_success AND length(NEW.on_success) > 255)
      OR (NEW.on_failure IS DISTINCT FROM OLD.on_failure AND length(NEW.on_failure) > 255))
EXECUTE FUNCTION task_runner_requests_refuse_impossible();

CREATE OR REPLACE FUNCTION task_runner_batches_refuse_impossible() RETURNS trigger AS $$
BEGIN
    IF length(NEW.on_complete) > 255 THEN
        RAISE EXCEPTION 'task_runner_batches: on_complete is longer than 255 characters, the longest task type name (got %)', length(NEW.on_complete)
            USING ERRCODE = 'check_violation';
    ELSIF length(NEW.on_failure) > 255 THEN
        RAISE EXCEPTION 'task_runner_batches: on_failure is longer than 255 characters, the longest task type name (got %)', length(NEW.on_failure)
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS task_runner_batches_check_insert ON task_runner_batches;
CREATE TRIGGER task_runner_batches_check_insert
BEFORE INSERT ON task_runner_batches
FOR EACH ROW
WHEN (length(NEW.on_complete) > 255 OR length(NEW.on_failure) > 255)
EXECUTE FUNCTION task_runner_batches_refuse_impossible();

DROP TRIGGER IF EXISTS task_runner_batches_check_update ON task_runner_batches;
CREATE TRIGGER task_runner_batches_check_update
BEFORE UPDATE ON task_runner_batches
FOR EACH ROW
WHEN ((NEW.on_complete IS DISTINCT FROM OLD.on_complete AND length(NEW.on_complete) > 255)
      OR (NEW.on_failure IS DISTINCT FROM OLD.on_failure AND length(NEW.on_failure) > 255))
EXECUTE FUNCTION task_runner_batches_refuse_impossible();

-- Tables in a schema of their own (`search_path` set for the daemon's
-- role or in its URL): an application whose sessions do not have that
-- schema on their path names the table with it, `jobs.task_runner_requests`,
-- and the batch member trigger then looked for `task_runner_batches` on the
-- application's path and failed every insert of a member. The function now
-- runs with the path set to the schema it was made in (pg_temp last, so
-- that a session's temporary table cannot stand in for the batches).
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION task_runner_requests_batch_member() SET search_path = %I, pg_temp',
                   current_schema());
END;
$$;
