-- The runnable rank (and so its index) now leaves out exhausted rows
-- (tries >= try_limit), so that a table holding many of them costs the claim
-- nothing. Its rule is the runnable rule minus the delay, as the claim writes it.
ALTER TABLE task_runner_requests
    MODIFY COLUMN claim_rank INTEGER AS (
        CASE WHEN pid IS NULL
              AND (result IS NULL OR result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED'))
              AND tries < try_limit
             THEN -priority END) STORED;
