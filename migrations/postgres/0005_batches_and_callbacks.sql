-- Batches and callbacks (README, "Batches and callbacks").
-- Every new column has a default, so an INSERT naming only task_class_name works.

CREATE TABLE IF NOT EXISTS task_runner_batches (
    id              BIGSERIAL PRIMARY KEY,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    name            TEXT,
    -- YAML: the batch's arguments, handed to its callbacks
    options         TEXT,
    -- task types run once when every member FINISHED / when the batch failed
    on_complete     TEXT,
    on_failure      TEXT,
    fail_fast       BOOLEAN NOT NULL DEFAULT true,
    -- no callback before it is set
    sealed_at       TIMESTAMPTZ,
    -- NULL until final; then FINISHED, FAILED or CANCELLED
    state           TEXT,
    finished_at     TIMESTAMPTZ,
    -- kept by the insert trigger below and by the transaction that records
    -- a member's final outcome (pending = members not final yet)
    total           INTEGER NOT NULL DEFAULT 0,
    pending         INTEGER NOT NULL DEFAULT 0,
    finished        INTEGER NOT NULL DEFAULT 0,
    failed          INTEGER NOT NULL DEFAULT 0,
    cancelled       INTEGER NOT NULL DEFAULT 0,
    -- the batch whose callback created this one (chains)
    parent_batch_id BIGINT
);

-- Batches not final yet, for the repair pass.
CREATE INDEX IF NOT EXISTS task_runner_batches_open
    ON task_runner_batches (id)
    WHERE state IS NULL;

-- the batch this request is a member of
ALTER TABLE task_runner_requests ADD COLUMN IF NOT EXISTS batch_id BIGINT;
-- task types run once when this request FINISHED / is exhausted or REJECTED
ALTER TABLE task_runner_requests ADD COLUMN IF NOT EXISTS on_success TEXT;
ALTER TABLE task_runner_requests ADD COLUMN IF NOT EXISTS on_failure TEXT;
-- the request whose outcome created this row (a callback)
ALTER TABLE task_runner_requests ADD COLUMN IF NOT EXISTS callback_of BIGINT;
-- the batch whose end created this row (a batch's callback)
ALTER TABLE task_runner_requests ADD COLUMN IF NOT EXISTS callback_of_batch BIGINT;

-- Members of a batch, for counting and listing.
CREATE INDEX IF NOT EXISTS task_runner_requests_batch
    ON task_runner_requests (batch_id)
    WHERE batch_id IS NOT NULL;

-- Members not final yet: "is any member still open?" reads one index entry.
CREATE INDEX IF NOT EXISTS task_runner_requests_batch_open
    ON task_runner_requests (batch_id)
    WHERE batch_id IS NOT NULL
      AND (result IS NULL OR result = 'RUNNING'
           OR (result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED') AND tries < try_limit));

-- Callbacks of a batch, for `batch show`.
CREATE INDEX IF NOT EXISTS task_runner_requests_callback_of_batch
    ON task_runner_requests (callback_of_batch)
    WHERE callback_of_batch IS NOT NULL;

-- Callbacks of a request, to create each once.
CREATE INDEX IF NOT EXISTS task_runner_requests_callback_of
    ON task_runner_requests (callback_of)
    WHERE callback_of IS NOT NULL;

-- A member inserted by any means (plain SQL included) is counted; a member
-- of a final or missing batch is refused. The UPDATE takes the batch row's
-- lock, waiting for a transaction that is ending the batch, and then reads
-- the batch's latest state: a member is never added to a batch that has
-- just become final.
CREATE OR REPLACE FUNCTION task_runner_requests_batch_member() RETURNS trigger AS $$
BEGIN
    UPDATE task_runner_batches SET total = total + 1, pending = pending + 1
     WHERE id = NEW.batch_id AND state IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'task_runner_requests.batch_id: batch % does not exist or is final', NEW.batch_id;
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS task_runner_requests_batch_member ON task_runner_requests;
CREATE TRIGGER task_runner_requests_batch_member
AFTER INSERT ON task_runner_requests
FOR EACH ROW
WHEN (NEW.batch_id IS NOT NULL)
EXECUTE FUNCTION task_runner_requests_batch_member();
