-- A periodic row's next occurrence is made once per row. Before, a row
-- retried by hand after its end (`taskrunner-cli retry`, or plain SQL)
-- made a second next occurrence when it ended again: from then on every
-- occurrence ran twice, each retry adding one more chain.
--
-- `next_of` names the row whose end made this occurrence (its cause); the
-- unique index keeps it to one. Written by the daemon only.
ALTER TABLE task_runner_requests ADD COLUMN IF NOT EXISTS next_of BIGINT;

CREATE UNIQUE INDEX IF NOT EXISTS task_runner_requests_next_of
    ON task_runner_requests (next_of)
    WHERE next_of IS NOT NULL;
