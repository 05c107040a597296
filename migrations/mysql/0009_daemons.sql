-- Each running daemon's row, so that the web page shows idle daemons too
-- (README, "The web page and metrics"). Written by the daemon itself: at
-- start, at each heartbeat, and once more when it stops. Nothing reads it
-- to decide anything about a request: leases stay on the request rows.

CREATE TABLE IF NOT EXISTS task_runner_daemons (
    -- the instance id the daemon writes into claimed_by
    instance        VARCHAR(255) NOT NULL PRIMARY KEY,
    host            VARCHAR(255) NOT NULL,
    node_name       VARCHAR(255),
    pid             INTEGER,
    version         VARCHAR(255),
    max_concurrent  INTEGER,
    -- tries it ran at its latest heartbeat
    running         INTEGER NOT NULL DEFAULT 0,
    started_at      DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    heartbeat_at    DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    -- set by a daemon that stopped cleanly
    stopped_at      DATETIME(6)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE INDEX task_runner_daemons_by_heartbeat
    ON task_runner_daemons (heartbeat_at);
