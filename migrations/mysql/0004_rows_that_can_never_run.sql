-- Rows an application could insert that can never run nor end are refused
-- with an error naming the rule (issue 13): a try_limit below 1, a row
-- never run with no try left (tries >= try_limit, result NULL), a result
-- that is not a state (an empty string included). (task_class_name is a
-- VARCHAR(255), and a time the server cannot read is refused by its
-- strict sql_mode already.)
--
-- Triggers rather than CHECK constraints: a CHECK judges the whole row at
-- every UPDATE, so one row written before this migration would fail every
-- claim that includes it, and adding one copies the table; a trigger
-- judges on UPDATE only what the statement changes, and adding it reads no
-- row. `taskrunner-cli list` flags the rows written before it that break a
-- rule.
CREATE TRIGGER task_runner_requests_check_insert
BEFORE INSERT ON task_runner_requests
FOR EACH ROW
BEGIN
    IF NEW.try_limit < 1 THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: try_limit must be at least 1';
    ELSEIF NEW.result IS NULL AND NEW.tries >= NEW.try_limit THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: a row never run (result NULL) needs tries < try_limit';
    ELSEIF NEW.result NOT IN ('RUNNING', 'FINISHED', 'FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED', 'CANCELLED', 'REJECTED') THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: result must be NULL or one of RUNNING, FINISHED, FAILED, CRASHED, TIMEOUT, INTERRUPTED, CANCELLED, REJECTED';
    END IF;
END;

CREATE TRIGGER task_runner_requests_check_update
BEFORE UPDATE ON task_runner_requests
FOR EACH ROW
BEGIN
    IF NOT (NEW.try_limit <=> OLD.try_limit) AND NEW.try_limit < 1 THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: try_limit must be at least 1';
    ELSEIF (NOT (NEW.result <=> OLD.result) OR NOT (NEW.tries <=> OLD.tries) OR NOT (NEW.try_limit <=> OLD.try_limit))
       AND NEW.result IS NULL AND NEW.tries >= NEW.try_limit THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: a row never run (result NULL) needs tries < try_limit';
    ELSEIF NOT (NEW.result <=> OLD.result)
       AND NEW.result NOT IN ('RUNNING', 'FINISHED', 'FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED', 'CANCELLED', 'REJECTED') THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: result must be NULL or one of RUNNING, FINISHED, FAILED, CRASHED, TIMEOUT, INTERRUPTED, CANCELLED, REJECTED';
    END IF;
END;
