-- SQLite stores what it is given whatever the column's type, and a name
-- bound as bytes (Python's `bytes`, a Ruby string in ASCII-8BIT) is a BLOB,
-- which never equals the same name as TEXT: a paused type's or queue's row
-- written so passed the claim's `NOT IN` of the paused names and ran, a
-- type's `concurrency:` limit did not count its rows, a row of `node` 'web-1'
-- waited for ever, and a `unique_key` did not meet its TEXT twin. Each name
-- written as a BLOB is stored as the TEXT of its bytes, by the statement
-- that wrote it. A new row whose BLOB `unique_key` an open row holds as
-- TEXT is refused, as the TEXT key is (under `INSERT OR IGNORE` too: the
-- row would have been taken, a second open row of the key).
--
-- An open row is one the unique index (migration 0002) holds; each check
-- of an open twin below is written with its predicate, so that it is a
-- look-up of that index, not a scan of the table.

-- Rows already written so, before the triggers exist: an open row's key
-- whose TEXT twin another open row holds is left as it is, so that the
-- upgrade never fails on it.
UPDATE task_runner_requests
   SET task_class_name = CAST(task_class_name AS TEXT), queue = CAST(queue AS TEXT),
       node = CAST(node AS TEXT), not_node = CAST(not_node AS TEXT),
       on_success = CAST(on_success AS TEXT), on_failure = CAST(on_failure AS TEXT)
 WHERE typeof(task_class_name) = 'blob' OR typeof(queue) = 'blob'
    OR typeof(node) = 'blob' OR typeof(not_node) = 'blob'
    OR typeof(on_success) = 'blob' OR typeof(on_failure) = 'blob';
UPDATE task_runner_requests
   SET unique_key = CAST(unique_key AS TEXT)
 WHERE typeof(unique_key) = 'blob'
   AND NOT ((result IS NULL OR result = 'RUNNING'
             OR (result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED') AND tries < try_limit))
            AND EXISTS (SELECT 1 FROM task_runner_requests AS twin
                         WHERE twin.unique_key = CAST(task_runner_requests.unique_key AS TEXT)
                           AND twin.unique_key IS NOT NULL
                           AND (twin.result IS NULL OR twin.result = 'RUNNING'
                                OR (twin.result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED')
                                    AND twin.tries < twin.try_limit))));

DROP TRIGGER IF EXISTS task_runner_requests_key_as_text_check;
CREATE TRIGGER task_runner_requests_key_as_text_check
BEFORE INSERT ON task_runner_requests
WHEN typeof(NEW.unique_key) = 'blob'
 AND (NEW.result IS NULL OR NEW.result = 'RUNNING'
      OR (NEW.result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED') AND NEW.tries < NEW.try_limit))
BEGIN
    SELECT RAISE(ABORT, 'task_runner_requests: unique_key is held by an open request (a key written as bytes is its text)')
     WHERE EXISTS (SELECT 1 FROM task_runner_requests AS twin
                    WHERE twin.unique_key = CAST(NEW.unique_key AS TEXT)
                      AND twin.unique_key IS NOT NULL
                      AND (twin.result IS NULL OR twin.result = 'RUNNING'
                           OR (twin.result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED')
                               AND twin.tries < twin.try_limit)));
END;

-- After the check above, a new row's key can be stored as text.
DROP TRIGGER IF EXISTS task_runner_requests_names_as_text_insert;
CREATE TRIGGER task_runner_requests_names_as_text_insert
AFTER INSERT ON task_runner_requests
WHEN typeof(NEW.task_class_name) = 'blob' OR typeof(NEW.queue) = 'blob'
  OR typeof(NEW.node) = 'blob' OR typeof(NEW.not_node) = 'blob'
  OR typeof(NEW.unique_key) = 'blob'
  OR typeof(NEW.on_success) = 'blob' OR typeof(NEW.on_failure) = 'blob'
BEGIN
    UPDATE task_runner_requests
       SET task_class_name = CAST(task_class_name AS TEXT), queue = CAST(queue AS TEXT),
           node = CAST(node AS TEXT), not_node = CAST(not_node AS TEXT),
           unique_key = CAST(unique_key AS TEXT),
           on_success = CAST(on_success AS TEXT), on_failure = CAST(on_failure AS TEXT)
     WHERE id = NEW.id;
END;

-- On an update, an open row's key whose TEXT twin another open row holds
-- is left as it is (a row written before this migration, see above): the
-- update of its other columns must not fail on it. The trigger's own
-- update leaves nothing its condition takes (it fires no more, even with
-- `PRAGMA recursive_triggers`).
DROP TRIGGER IF EXISTS task_runner_requests_names_as_text_update;
CREATE TRIGGER task_runner_requests_names_as_text_update
AFTER UPDATE OF task_class_name, queue, node, not_node, unique_key, on_success, on_failure
ON task_runner_requests
WHEN typeof(NEW.task_class_name) = 'blob' OR typeof(NEW.queue) = 'blob'
  OR typeof(NEW.node) = 'blob' OR typeof(NEW.not_node) = 'blob'
  OR typeof(NEW.on_success) = 'blob' OR typeof(NEW.on_failure) = 'blob'
  OR (typeof(NEW.unique_key) = 'blob'
      AND NOT ((NEW.result IS NULL OR NEW.result = 'RUNNING'
                OR (NEW.result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED') AND NEW.tries < NEW.try_limit))
               AND EXISTS (SELECT 1 FROM task_runner_requests AS twin
                            WHERE twin.unique_key = CAST(NEW.unique_key AS TEXT)
                              AND twin.unique_key IS NOT NULL
                              AND (twin.result IS NULL OR twin.result = 'RUNNING'
                                   OR (twin.result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED')
                                       AND twin.tries < twin.try_limit)))))
BEGIN
    UPDATE task_runner_requests
       SET task_class_name = CAST(task_class_name AS TEXT), queue = CAST(queue AS TEXT),
           node = CAST(node AS TEXT), not_node = CAST(not_node AS TEXT),
           unique_key = CASE
               WHEN typeof(unique_key) = 'blob'
                AND (result IS NULL OR result = 'RUNNING'
                     OR (result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED') AND tries < try_limit))
                AND EXISTS (SELECT 1 FROM task_runner_requests AS twin
                             WHERE twin.unique_key = CAST(NEW.unique_key AS TEXT)
                               AND twin.unique_key IS NOT NULL
                               AND (twin.result IS NULL OR twin.result = 'RUNNING'
                                    OR (twin.result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED')
                                        AND twin.tries < twin.try_limit)))
               THEN unique_key ELSE CAST(unique_key AS TEXT) END,
           on_success = CAST(on_success AS TEXT), on_failure = CAST(on_failure AS TEXT)
     WHERE id = NEW.id;
END;
