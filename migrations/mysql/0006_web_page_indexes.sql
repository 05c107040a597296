-- Indexes for the web page and the metrics, so that each of their queries
-- reads a bounded number of index entries at a million rows.

-- Requests by state, by type and by queue, newest first (the requests page).
CREATE INDEX task_runner_requests_by_result
    ON task_runner_requests (result, id);
CREATE INDEX task_runner_requests_by_type
    ON task_runner_requests (task_class_name, id);
CREATE INDEX task_runner_requests_by_queue
    ON task_runner_requests (queue, id);

-- Rows per queue and type, covering what the overview and the metrics
-- count (MySQL has no partial index: it holds final rows too).
CREATE INDEX task_runner_requests_open
    ON task_runner_requests (queue, task_class_name, result, tries, try_limit);

-- Runnable rows per queue: the lag of a queue is the age of its first one.
CREATE INDEX task_runner_requests_runnable_by_queue
    ON task_runner_requests (queue, claim_rank, id);
