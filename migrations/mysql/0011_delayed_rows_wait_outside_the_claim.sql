-- Rows delayed into the future wait outside the claim's indexes. Before, the
-- claim read the range `claim_rank IS NOT NULL` in claim order and skipped
-- each row whose delay had not passed: 200,000 rows delayed by a day, ahead
-- of a due row, made every claim read 200,000 index entries
-- (docs/performance.md).
--
-- A delayed row is in the claim's range once a daemon has seen its delay
-- pass and written the time it did into `delay_passed_at` (the daemon's
-- release of due rows, `Store::release_delays`). A later `delay_until` (a
-- retry's backoff, an application postponing the row) is past
-- `delay_passed_at`, so the row waits again: nothing else has to clear it.
-- Without partial indexes, two stored generated columns carry the rules:
-- `ready_rank` (-priority for a runnable row whose delay is not ahead: the
-- claim's range) and `waiting_until` (delay_until for a runnable row still
-- waiting for it: what the release and the next delay read). `claim_rank`
-- stays the runnable rule, which the web page and the CLI count by.
ALTER TABLE task_runner_requests
    ADD COLUMN delay_passed_at DATETIME(6),
    ADD COLUMN ready_rank INTEGER AS (
        CASE WHEN pid IS NULL
              AND (result IS NULL OR result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED'))
              AND tries < try_limit
              AND (delay_until IS NULL OR delay_until <= delay_passed_at)
             THEN -priority END) STORED,
    ADD COLUMN waiting_until DATETIME(6) AS (
        CASE WHEN pid IS NULL
              AND (result IS NULL OR result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED'))
              AND tries < try_limit
              AND delay_until IS NOT NULL AND (delay_passed_at IS NULL OR delay_until > delay_passed_at)
             THEN delay_until END) STORED;

CREATE INDEX task_runner_requests_ready
    ON task_runner_requests (ready_rank, id);
CREATE INDEX task_runner_requests_ready_of_queue
    ON task_runner_requests (queue, ready_rank, id);
DROP INDEX task_runner_requests_runnable_of_type ON task_runner_requests;
CREATE INDEX task_runner_requests_runnable_of_type
    ON task_runner_requests (task_class_name, ready_rank, id);
CREATE INDEX task_runner_requests_waiting
    ON task_runner_requests (waiting_until);
