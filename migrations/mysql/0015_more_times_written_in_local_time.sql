-- Migration 0001's triggers stored `created_at` and `delay_until` written
-- by a session on local time (the mysql client on a server in local time,
-- `NOW()`) as UTC, as a TIMESTAMP column would be. Two more times an
-- application writes are read at an instant by the daemon, and were off by
-- the session's offset: `planned_at` of a periodic row it inserts (its
-- next occurrence was planned from the wrong time, and ran at once on a
-- session behind UTC), and `cancel_requested_at` of the row it cancels by
-- plain SQL (a cancel written from a session behind UTC fell before the
-- row's last end, and a claim took it for a stale one: the row ran). The
-- two triggers are made again with them added. Sessions on UTC, the
-- daemon's among them, change nothing.
DROP TRIGGER IF EXISTS task_runner_requests_normalise_insert;
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
        SET NEW.planned_at = coalesce(CONVERT_TZ(NEW.planned_at, @@session.time_zone, '+00:00'),
                                      NEW.planned_at - INTERVAL offset_seconds SECOND);
        SET NEW.cancel_requested_at =
            coalesce(CONVERT_TZ(NEW.cancel_requested_at, @@session.time_zone, '+00:00'),
                     NEW.cancel_requested_at - INTERVAL offset_seconds SECOND);
    END IF;
END;

DROP TRIGGER IF EXISTS task_runner_requests_normalise_update;
CREATE TRIGGER task_runner_requests_normalise_update
BEFORE UPDATE ON task_runner_requests
FOR EACH ROW
BEGIN
    DECLARE offset_seconds BIGINT DEFAULT TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(), NOW());
    IF offset_seconds <> 0 AND NOT (NEW.delay_until <=> OLD.delay_until) THEN
        SET NEW.delay_until = coalesce(CONVERT_TZ(NEW.delay_until, @@session.time_zone, '+00:00'),
                                       NEW.delay_until - INTERVAL offset_seconds SECOND);
    END IF;
    IF offset_seconds <> 0 AND NOT (NEW.planned_at <=> OLD.planned_at) THEN
        SET NEW.planned_at = coalesce(CONVERT_TZ(NEW.planned_at, @@session.time_zone, '+00:00'),
                                      NEW.planned_at - INTERVAL offset_seconds SECOND);
    END IF;
    IF offset_seconds <> 0 AND NOT (NEW.cancel_requested_at <=> OLD.cancel_requested_at) THEN
        SET NEW.cancel_requested_at =
            coalesce(CONVERT_TZ(NEW.cancel_requested_at, @@session.time_zone, '+00:00'),
                     NEW.cancel_requested_at - INTERVAL offset_seconds SECOND);
    END IF;
END;
