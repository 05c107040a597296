-- What a request's ends have made, kept apart from the rows they made.
--
-- A request's end makes its follow-ups once: its periodic next occurrence
-- and its `on_success`, `on_failure` and `on_exhausted` callbacks. A row
-- retried by hand and ending again makes none a second time. Before, that
-- "once" was read from the rows made (`next_of`, the callback's
-- `unique_key`), and retention deleted them: a finished next occurrence or
-- callback pruned after a week (`retention: finished: 7d`) while its cause,
-- an exhausted failure, was kept, and the failure retried by hand then made
-- them again, a second chain of the periodic row beside the first, and a
-- second callback.
--
-- A row here names a request and what its end made (`next`, `success`,
-- `failure`, `exhausted`). It is written in the transaction that made the
-- follow-up, under the request's lock, and it lives as long as the request
-- does: a request's delete (retention, `purge`, an application's own
-- `DELETE`) deletes its rows here by the trigger below, and nothing else
-- does. An application's copy of a request (Rails' `dup`) has an id of its
-- own, so nothing here holds the copy back.
CREATE TABLE IF NOT EXISTS task_runner_follow_ups (
    request_id INTEGER NOT NULL,
    cause      TEXT NOT NULL CHECK (cause IN ('next', 'success', 'failure', 'exhausted')),
    PRIMARY KEY (request_id, cause)
);

CREATE TRIGGER IF NOT EXISTS task_runner_requests_follow_ups_gone
AFTER DELETE ON task_runner_requests
FOR EACH ROW
BEGIN
    DELETE FROM task_runner_follow_ups WHERE request_id = OLD.id;
END;

-- What the rows still here say was made.
INSERT OR IGNORE INTO task_runner_follow_ups (request_id, cause)
SELECT DISTINCT made.next_of, 'next' FROM task_runner_requests AS made
 WHERE made.next_of IS NOT NULL
   AND EXISTS (SELECT 1 FROM task_runner_requests AS cause WHERE cause.id = made.next_of);

INSERT OR IGNORE INTO task_runner_follow_ups (request_id, cause)
SELECT DISTINCT made.callback_of,
       CASE WHEN made.unique_key LIKE 'request:%:success' THEN 'success'
            WHEN made.unique_key LIKE 'request:%:failure' THEN 'failure'
            ELSE 'exhausted' END
  FROM task_runner_requests AS made
 WHERE made.callback_of IS NOT NULL
   AND (made.unique_key LIKE 'request:%:success' OR made.unique_key LIKE 'request:%:failure'
        OR made.unique_key LIKE 'request:%:exhausted')
   AND EXISTS (SELECT 1 FROM task_runner_requests AS cause WHERE cause.id = made.callback_of);
