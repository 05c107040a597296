-- A periodic row's next occurrence is made once per row. Before, a row
-- retried by hand after its end (`taskrunner-cli retry`, or plain SQL)
-- made a second next occurrence when it ended again: from then on every
-- occurrence ran twice, each retry adding one more chain.
--
-- `next_of` names the row whose end made this occurrence (its cause). The
-- daemon makes an occurrence only when none names the row yet, checked in
-- the transaction that records the row's end, under its lock; the index is
-- not unique, so that an application may insert a copy of a row (Rails'
-- `dup` copies every column but the id).
ALTER TABLE task_runner_requests ADD COLUMN IF NOT EXISTS next_of BIGINT;

CREATE INDEX IF NOT EXISTS task_runner_requests_next_of
    ON task_runner_requests (next_of)
    WHERE next_of IS NOT NULL;
