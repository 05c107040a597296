-- Each running daemon's row, so that the web page shows idle daemons too
-- (README, "The web page and metrics"). Written by the daemon itself: at
-- start, at each heartbeat, and once more when it stops. Nothing reads it
-- to decide anything about a request: leases stay on the request rows.

CREATE TABLE IF NOT EXISTS task_runner_daemons (
    -- the instance id the daemon writes into claimed_by
    instance        TEXT PRIMARY KEY,
    host            TEXT NOT NULL,
    node_name       TEXT,
    pid             INTEGER,
    version         TEXT,
    max_concurrent  INTEGER,
    -- tries it ran at its latest heartbeat
    running         INTEGER NOT NULL DEFAULT 0,
    started_at      DATETIME NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    heartbeat_at    DATETIME NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    -- set by a daemon that stopped cleanly
    stopped_at      DATETIME
);

CREATE INDEX IF NOT EXISTS task_runner_daemons_by_heartbeat
    ON task_runner_daemons (heartbeat_at);
