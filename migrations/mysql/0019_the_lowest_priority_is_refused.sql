-- The lowest INTEGER, -2147483648, is refused as a priority, with an
-- error naming the rule. The generated columns that order the claims
-- (`claim_rank`, `ready_rank`) hold -priority, which does not fit an
-- INTEGER for that one value. A runnable row cannot be written with it
-- (the generated column refuses it), but a row running, or ended, could be
-- given it by an UPDATE; when its try then ended with tries left, the
-- daemon's outcome write made it runnable, was refused ("Out of range
-- value for column 'claim_rank'"), and was retried for ever: no later
-- outcome of that daemon was recorded. Migration 0013's two triggers are
-- made again with the rule added; as there, an UPDATE is judged only on
-- what it changes. A row given that priority before is given the lowest
-- one allowed, -2147483647.
UPDATE task_runner_requests SET priority = -2147483647 WHERE priority = -2147483648;

DROP TRIGGER IF EXISTS task_runner_requests_check_insert;
CREATE TRIGGER task_runner_requests_check_insert
BEFORE INSERT ON task_runner_requests
FOR EACH ROW
BEGIN
    IF NEW.try_limit < 1 THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: try_limit must be at least 1';
    ELSEIF NEW.tries < 0 THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: tries must be a whole number, at least 0';
    ELSEIF NEW.result IS NULL AND NEW.tries >= NEW.try_limit THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: a row never run (result NULL) needs tries < try_limit';
    ELSEIF NEW.result NOT IN ('RUNNING', 'FINISHED', 'FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED', 'CANCELLED', 'REJECTED') THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: result must be NULL or one of RUNNING, FINISHED, FAILED, CRASHED, TIMEOUT, INTERRUPTED, CANCELLED, REJECTED';
    ELSEIF NEW.period < 1 THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: period must be NULL (not periodic) or a whole number of seconds, at least 1';
    ELSEIF NEW.priority = -2147483648 THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: priority must be from -2147483647 to 2147483647';
    END IF;
END;

DROP TRIGGER IF EXISTS task_runner_requests_check_update;
CREATE TRIGGER task_runner_requests_check_update
BEFORE UPDATE ON task_runner_requests
FOR EACH ROW
BEGIN
    IF NOT (NEW.try_limit <=> OLD.try_limit) AND NEW.try_limit < 1 THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: try_limit must be at least 1';
    ELSEIF NOT (NEW.tries <=> OLD.tries) AND NEW.tries < 0 THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: tries must be a whole number, at least 0';
    ELSEIF (NOT (NEW.result <=> OLD.result) OR NOT (NEW.tries <=> OLD.tries) OR NOT (NEW.try_limit <=> OLD.try_limit))
       AND NEW.result IS NULL AND NEW.tries >= NEW.try_limit THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: a row never run (result NULL) needs tries < try_limit';
    ELSEIF NOT (NEW.result <=> OLD.result)
       AND NEW.result NOT IN ('RUNNING', 'FINISHED', 'FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED', 'CANCELLED', 'REJECTED') THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: result must be NULL or one of RUNNING, FINISHED, FAILED, CRASHED, TIMEOUT, INTERRUPTED, CANCELLED, REJECTED';
    ELSEIF NOT (NEW.period <=> OLD.period) AND NEW.period < 1 THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: period must be NULL (not periodic) or a whole number of seconds, at least 1';
    ELSEIF NOT (NEW.priority <=> OLD.priority) AND NEW.priority = -2147483648 THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'task_runner_requests: priority must be from -2147483647 to 2147483647';
    END IF;
END;
