-- Migration 0002's triggers store `delay_until`, `planned_at` and
-- `created_at` written in another form (an offset, `T…Z`, a Julian day
-- number) as `YYYY-MM-DD HH:MM:SS.SSS` in UTC, the form the daemon
-- compares as text. `cancel_requested_at`, which an application writes to
-- cancel a row by plain SQL, was left as written, and the claim compares it
-- with the row's last `completed_at`: a cancel written as
-- `2026-11-23 22:00:05-05:00` five seconds after a try's end at
-- `2026-11-24 03:00:00.345` sorted before it, was taken for the cancel of
-- that try, and the row ran again; an old one written as `…T06:59:00Z`
-- sorted after `… 07:00:00` and stopped a row retried since. The two
-- triggers are made again with it added, as MariaDB's migration 0015 did.
DROP TRIGGER IF EXISTS task_runner_requests_normalise_update;
CREATE TRIGGER task_runner_requests_normalise_update
AFTER UPDATE OF delay_until, planned_at, cancel_requested_at ON task_runner_requests
WHEN (NEW.delay_until IS NOT NULL AND strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until) IS NOT NULL
      AND NEW.delay_until IS NOT strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until))
  OR (NEW.planned_at IS NOT NULL AND strftime('%Y-%m-%d %H:%M:%f', NEW.planned_at) IS NOT NULL
      AND NEW.planned_at IS NOT strftime('%Y-%m-%d %H:%M:%f', NEW.planned_at))
  OR (NEW.cancel_requested_at IS NOT NULL
      AND strftime('%Y-%m-%d %H:%M:%f', NEW.cancel_requested_at) IS NOT NULL
      AND NEW.cancel_requested_at IS NOT strftime('%Y-%m-%d %H:%M:%f', NEW.cancel_requested_at))
BEGIN
    UPDATE task_runner_requests
       SET delay_until = coalesce(strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until), NEW.delay_until),
           planned_at = coalesce(strftime('%Y-%m-%d %H:%M:%f', NEW.planned_at), NEW.planned_at),
           cancel_requested_at = coalesce(strftime('%Y-%m-%d %H:%M:%f', NEW.cancel_requested_at),
                                          NEW.cancel_requested_at)
     WHERE id = NEW.id;
END;

DROP TRIGGER IF EXISTS task_runner_requests_normalise_insert;
CREATE TRIGGER task_runner_requests_normalise_insert
AFTER INSERT ON task_runner_requests
WHEN (NEW.delay_until IS NOT NULL AND strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until) IS NOT NULL
      AND NEW.delay_until IS NOT strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until))
  OR (strftime('%Y-%m-%d %H:%M:%f', NEW.created_at) IS NOT NULL
      AND NEW.created_at IS NOT strftime('%Y-%m-%d %H:%M:%f', NEW.created_at))
  OR (NEW.planned_at IS NOT NULL AND strftime('%Y-%m-%d %H:%M:%f', NEW.planned_at) IS NOT NULL
      AND NEW.planned_at IS NOT strftime('%Y-%m-%d %H:%M:%f', NEW.planned_at))
  OR (NEW.cancel_requested_at IS NOT NULL
      AND strftime('%Y-%m-%d %H:%M:%f', NEW.cancel_requested_at) IS NOT NULL
      AND NEW.cancel_requested_at IS NOT strftime('%Y-%m-%d %H:%M:%f', NEW.cancel_requested_at))
BEGIN
    UPDATE task_runner_requests
       SET delay_until = coalesce(strftime('%Y-%m-%d %H:%M:%f', NEW.delay_until), NEW.delay_until),
           created_at = coalesce(strftime('%Y-%m-%d %H:%M:%f', NEW.created_at), NEW.created_at),
           planned_at = coalesce(strftime('%Y-%m-%d %H:%M:%f', NEW.planned_at), NEW.planned_at),
           cancel_requested_at = coalesce(strftime('%Y-%m-%d %H:%M:%f', NEW.cancel_requested_at),
                                          NEW.cancel_requested_at)
     WHERE id = NEW.id;
END;
