-- The request table: the API for applications (see README, "The table").
-- MariaDB ≥ 10.6 / MySQL ≥ 8.0.1. Timestamps are DATETIME(6) holding UTC
-- (taskrunner's sessions use time_zone '+00:00'; the triggers below turn a
-- time written by a session in another time zone into UTC). Text compares
-- case-sensitively (utf8mb4_bin), as on SQLite and PostgreSQL: `noop` is
-- not `NoOp`. Columns that are indexed are VARCHAR(255) (InnoDB cannot
-- index TEXT whole); options and result_text hold up to 16 MiB.
CREATE TABLE IF NOT EXISTS task_runner_requests (
    id                  BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    created_at          DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    task_class_name     VARCHAR(255) NOT NULL,
    options             MEDIUMTEXT,
    pid                 INTEGER,
    host                VARCHAR(255),
    started_at          DATETIME(6),
    completed_at        DATETIME(6),
    heartbeat_at        DATETIME(6),
    result              VARCHAR(255),
    result_text         MEDIUMTEXT,
    tries               INTEGER NOT NULL DEFAULT 0,
    try_limit           INTEGER NOT NULL DEFAULT 5,
    delay_until         DATETIME(6),
    -- higher runs first; ties by id
    priority            INTEGER NOT NULL DEFAULT 0,
    -- fencing: a fresh token per claim, and the daemon instance holding it
    claim_token         VARCHAR(255),
    claimed_by          VARCHAR(255),
    -- identity of the process recorded at spawn
    pid_boot_id         VARCHAR(255),
    pid_start_ticks     BIGINT,
    cancel_requested_at DATETIME(6),
    -- the latest `progress:` line of the running try
    progress            TEXT,
    -- Without partial indexes: -priority for a runnable row (the runnable
    -- rule minus the delay), NULL otherwise. Its index holds the runnable
    -- rows as one range in claim order (priority DESC, id).
    claim_rank          INTEGER AS (
        CASE WHEN pid IS NULL
              AND (result IS NULL OR result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED'))
             THEN -priority END) STORED
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Runnable rows, in claim order: the claim reads the range claim_rank IS NOT NULL.
CREATE INDEX task_runner_requests_runnable
    ON task_runner_requests (claim_rank, id);

-- Running rows, for the reaper and lease checks; and by daemon instance, for heartbeats.
CREATE INDEX task_runner_requests_running
    ON task_runner_requests (result, host, claimed_by);
CREATE INDEX task_runner_requests_held
    ON task_runner_requests (claimed_by, result);

-- Final rows by age, for purge.
CREATE INDEX task_runner_requests_completed
    ON task_runner_requests (completed_at);

-- A time written by a session whose time zone is not UTC (the mysql client
-- on a server in local time, `NOW()`, the created_at default) is that
-- session's local time: stored as UTC, as a TIMESTAMP column would be.
CREATE TRIGGER task_runner_requests_normalise_insert
BEFORE INSERT ON task_runner_requests
FOR EACH ROW
BEGIN
    DECLARE offset_seconds BIGINT DEFAULT TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(), NOW());
    IF offset_seconds <> 0 THEN
        SET NEW.created_at = coalesce(CONVERT_TZ(NEW.created_at, @@session.time_zone, '+00:00'),
                                      NEW.created_at - INTERVAL offset_seconds SECOND);
        SET NEW.delay_until = coalesce(CONVERT_TZ(NEW.delay_until, @@session.time_zone, '+00:00'),
                                       NEW.delay_until - INTERVAL offset_seconds SECOND);
    END IF;
END;

CREATE TRIGGER task_runner_requests_normalise_update
BEFORE UPDATE ON task_runner_requests
FOR EACH ROW
BEGIN
    DECLARE offset_seconds BIGINT DEFAULT TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(), NOW());
    IF offset_seconds <> 0 AND NOT (NEW.delay_until <=> OLD.delay_until) THEN
        SET NEW.delay_until = coalesce(CONVERT_TZ(NEW.delay_until, @@session.time_zone, '+00:00'),
                                       NEW.delay_until - INTERVAL offset_seconds SECOND);
    END IF;
END;
