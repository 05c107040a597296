-- The request table: the API for applications (see README, "The table").
CREATE TABLE IF NOT EXISTS task_runner_requests (
    id                  BIGSERIAL PRIMARY KEY,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    task_class_name     TEXT NOT NULL,
    options             TEXT,
    pid                 INTEGER,
    host                TEXT,
    started_at          TIMESTAMPTZ,
    completed_at        TIMESTAMPTZ,
    heartbeat_at        TIMESTAMPTZ,
    result              TEXT,
    result_text         TEXT,
    tries               INTEGER NOT NULL DEFAULT 0,
    try_limit           INTEGER NOT NULL DEFAULT 5,
    delay_until         TIMESTAMPTZ,
    -- higher runs first; ties by id
    priority            INTEGER NOT NULL DEFAULT 0,
    -- fencing: a fresh token per claim, and the daemon instance holding it
    claim_token         TEXT,
    claimed_by          TEXT,
    -- identity of the process recorded at spawn
    pid_boot_id         TEXT,
    pid_start_ticks     BIGINT,
    cancel_requested_at TIMESTAMPTZ,
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

-- Wake every listening daemon when a row becomes runnable (LISTEN task_runner_requests).
CREATE OR REPLACE FUNCTION task_runner_requests_notify() RETURNS trigger AS $$
BEGIN
    -- A constant payload lets PostgreSQL fold the notifications of one transaction into one.
    PERFORM pg_notify('task_runner_requests', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS task_runner_requests_notify ON task_runner_requests;
CREATE TRIGGER task_runner_requests_notify
AFTER INSERT OR UPDATE OF result, pid, delay_until ON task_runner_requests
FOR EACH ROW
WHEN (NEW.pid IS NULL AND (NEW.result IS NULL OR NEW.result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED')))
EXECUTE FUNCTION task_runner_requests_notify();
