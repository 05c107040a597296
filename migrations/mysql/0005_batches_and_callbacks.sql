-- Batches and callbacks (README, "Batches and callbacks").
-- Every new column has a default, so an INSERT naming only task_class_name works.

CREATE TABLE IF NOT EXISTS task_runner_batches (
    id              BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    created_at      DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    name            TEXT,
    -- YAML: the batch's arguments, handed to its callbacks
    options         MEDIUMTEXT,
    -- task types run once when every member FINISHED / when the batch failed
    on_complete     VARCHAR(255),
    on_failure      VARCHAR(255),
    fail_fast       BOOLEAN NOT NULL DEFAULT true,
    -- no callback before it is set
    sealed_at       DATETIME(6),
    -- NULL until final; then FINISHED, FAILED or CANCELLED
    state           VARCHAR(255),
    finished_at     DATETIME(6),
    -- kept by the insert trigger below and by the transaction that records
    -- a member's final outcome (pending = members not final yet)
    total           INTEGER NOT NULL DEFAULT 0,
    pending         INTEGER NOT NULL DEFAULT 0,
    finished        INTEGER NOT NULL DEFAULT 0,
    failed          INTEGER NOT NULL DEFAULT 0,
    cancelled       INTEGER NOT NULL DEFAULT 0,
    -- the batch whose callback created this one (chains)
    parent_batch_id BIGINT
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Batches not final yet, for the repair pass.
CREATE INDEX task_runner_batches_open
    ON task_runner_batches (state, id);

ALTER TABLE task_runner_requests
    -- the batch this request is a member of
    ADD COLUMN batch_id BIGINT,
    -- task types run once when this request FINISHED / is exhausted or REJECTED
    ADD COLUMN on_success VARCHAR(255),
    ADD COLUMN on_failure VARCHAR(255),
    -- the request whose outcome created this row (a callback)
    ADD COLUMN callback_of BIGINT,
    -- the batch whose end created this row (a batch's callback)
    ADD COLUMN callback_of_batch BIGINT;

-- Members of a batch, for counting and listing, and "is any member still open?".
CREATE INDEX task_runner_requests_batch
    ON task_runner_requests (batch_id, result);

-- Callbacks of a batch, for `batch show`.
CREATE INDEX task_runner_requests_callback_of_batch
    ON task_runner_requests (callback_of_batch);

-- Callbacks of a request, to create each once.
CREATE INDEX task_runner_requests_callback_of
    ON task_runner_requests (callback_of);

-- A member inserted by any means (plain SQL included) is counted; a member
-- of a final or missing batch is refused. The UPDATE takes the batch row's
-- lock, waiting for a transaction that is ending the batch, and then reads
-- the batch's latest state: a member is never added to a batch that has
-- just become final.
CREATE TRIGGER task_runner_requests_batch_member
AFTER INSERT ON task_runner_requests
FOR EACH ROW
BEGIN
    DECLARE message VARCHAR(255);
    IF NEW.batch_id IS NOT NULL THEN
        UPDATE task_runner_batches SET total = total + 1, pending = pending + 1
         WHERE id = NEW.batch_id AND state IS NULL;
        IF ROW_COUNT() = 0 THEN
            SET message = CONCAT('task_runner_requests.batch_id: batch ', NEW.batch_id,
                                 ' does not exist or is final');
            SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = message;
        END IF;
    END IF;
END;
