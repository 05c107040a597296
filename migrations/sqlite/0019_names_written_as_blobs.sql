-- SQLite stores what it is given whatever the column's type, and a name
-- bound as bytes (Python's `bytes`, a Ruby string in ASCII-8BIT) is a BLOB,
-- which never equals the same name as TEXT: a paused type's or queue's row
-- written so passed the claim's `NOT IN` of the paused names and ran, a
-- type's `concurrency:` limit did not count its rows, a row of `node` 'web-1'
-- waited for ever, and a `unique_key` did not meet its TEXT twin. Each name
-- written as a BLOB is stored as the TEXT of its bytes, in the statement
-- that wrote it. A new row's `unique_key` then held by another open row
-- refuses the statement, as the TEXT key would have; under `INSERT OR
-- IGNORE` that conflict is ignored and the key alone stays a BLOB (the
-- names are stored apart from the key, so that they are text even then).

-- Rows already written so, before the triggers (which would fire on this
-- update): a key whose TEXT twin is already stored is left as it is, so
-- that the upgrade never fails on it.
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
   AND NOT EXISTS (SELECT 1 FROM task_runner_requests AS twin
                    WHERE twin.unique_key = CAST(task_runner_requests.unique_key AS TEXT));

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
           on_success = CAST(on_success AS TEXT), on_failure = CAST(on_failure AS TEXT)
     WHERE id = NEW.id;
    UPDATE task_runner_requests
       SET unique_key = CAST(unique_key AS TEXT)
     WHERE id = NEW.id AND typeof(unique_key) = 'blob';
END;

-- On an update, a key whose TEXT twin another row holds is left as it is
-- (the row was written before this migration, see above): the update of
-- another of its columns must not fail on it.
DROP TRIGGER IF EXISTS task_runner_requests_names_as_text_update;
CREATE TRIGGER task_runner_requests_names_as_text_update
AFTER UPDATE OF task_class_name, queue, node, not_node, unique_key, on_success, on_failure
ON task_runner_requests
WHEN typeof(NEW.task_class_name) = 'blob' OR typeof(NEW.queue) = 'blob'
  OR typeof(NEW.node) = 'blob' OR typeof(NEW.not_node) = 'blob'
  OR typeof(NEW.unique_key) = 'blob'
  OR typeof(NEW.on_success) = 'blob' OR typeof(NEW.on_failure) = 'blob'
BEGIN
    UPDATE task_runner_requests
       SET task_class_name = CAST(task_class_name AS TEXT), queue = CAST(queue AS TEXT),
           node = CAST(node AS TEXT), not_node = CAST(not_node AS TEXT),
           on_success = CAST(on_success AS TEXT), on_failure = CAST(on_failure AS TEXT)
     WHERE id = NEW.id;
    UPDATE task_runner_requests
       SET unique_key = CAST(unique_key AS TEXT)
     WHERE id = NEW.id AND typeof(unique_key) = 'blob'
       AND NOT EXISTS (SELECT 1 FROM task_runner_requests AS twin
                        WHERE twin.unique_key = CAST(NEW.unique_key AS TEXT));
END;
