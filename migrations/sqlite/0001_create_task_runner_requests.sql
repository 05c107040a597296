-- The request table: the API for applications (see README, "The table").
-- Timestamps are UTC text 'YYYY-MM-DD HH:MM:SS.SSS'; the triggers below
-- normalise whatever form an application writes, so that text comparisons
-- and indexes stay right.
CREATE TABLE IF NOT EXISTS task_runner_requests (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at          DATETIME NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    task_class_name     TEXT NOT NULL,
    options             TEXT,
    pid                 INTEGER,
    host                TEXT,
    started_at          DATETIME,
    completed_at        DATETIME,
    heartbeat_at        DATETIME,
    result              TEXT,
    result_text         TEXT,
    tries               INTEGER NOT NULL DEFAULT 0,
    try_limit           INTEGER NOT NULL DEFAULT 5,
    delay_until         DATETIME,
    -- higher runs first; ties by id
    priority            INTEGER NOT NULL DEFAULT 0,
    -- fencing: a fresh token per claim, and the daemon instance holding it
    claim_token         TEXT,
    claimed_by          TEXT,
    -- identity of the process recorded at spawn
    pid_boot_id         TEXT,
    pid_start_ticks     INTEGER,
    cancel_requested_at DATETIME,
    -- the latest `progress:` line of the running try
    progress            TEXT
);

-- Runnable rows, in claim order. Partial, so a million finished rows cost nothing.
CREATE INDEX IF NOT EXISTS task_runner_requests_runnable
    ON task_runner_requests (priority DESC, id)
    WHERE pid IS NULL
      AND (result IS NULL OR result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED'));

-- Running rows, for the heartbeat, the reaper and lease checks.
CREATE INDEX IF NOT EXISTS task_runner_requests_running
    ON task_runner_requests (host, claimed_by)
    WHERE result = 'RUNNING';

-- Final rows by age, for purge.
CREATE INDEX IF NOT EXISTS task_runner_requests_completed
    ON task_runner_requests (completed_at)
    WHERE completed_at IS NOT NULL;

-- Normalise application-written timestamps ('2026-11-24T07:00:00Z',
-- '2026-11-24 07:00:00.123456', '…+02:00') to UTC 'YYYY-MM-DD HH:MM:SS.SSS'.
-- Values SQLite cannot read as a time are left as written.
CREATE TRIGGER IF NOT EXISTS task_runner_requests_normalise_insert
AFTER INSERT ON task_runner_requests
WHEN (NEW.delay_until IS NOT NULL AND strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until) IS NOT NULL
      AND NEW.delay_until IS NOT strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until))
  OR (strftime('%Y-%m-%d %H:%M:%f', NEW.created_at) IS NOT NULL
      AND NEW.created_at IS NOT strftime('%Y-%m-%d %H:%M:%f', NEW.created_at))
BEGIN
    UPDATE task_runner_requests
       SET delay_until = coalesce(strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until), NEW.delay_until),
           created_at = coalesce(strftime('%Y-%m-%d %H:%M:%f', NEW.created_at), NEW.created_at)
     WHERE id = NEW.id;
END;

CREATE TRIGGER IF NOT EXISTS task_runner_requests_normalise_update
AFTER UPDATE OF delay_until ON task_runner_requests
WHEN NEW.delay_until IS NOT NULL
 AND strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until) IS NOT NULL
 AND NEW.delay_until IS NOT strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until)
BEGIN
    UPDATE task_runner_requests
       SET delay_until = strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until)
     WHERE id = NEW.id;
END;
