-- Runnable rows of one queue, and of one task type, in claim order, for the
-- claims that take only those: a daemon's `queues:` and a task type with a
-- concurrency limit. Only the index by type is new here: MySQL's
-- `runnable_by_queue` (0006, queue, claim_rank, id) is in claim order
-- already, as the other backends' `runnable_of_queue` of this migration is.
CREATE INDEX task_runner_requests_runnable_of_type
    ON task_runner_requests (task_class_name, claim_rank, id);
