-- SQLite stores what it is given whatever the column's type, and a name
-- bound as bytes (Python's `bytes`, a Ruby string in ASCII-8BIT) is a BLOB,
-- which never equals the same name as TEXT: a paused type's or queue's row
-- written so passed the claim's `NOT IN` of the paused names and ran, a
-- type's `concurrency:` limit did not count its rows, a row of `node` 'web-1'
-- waited for ever, and a `unique_key` did not meet its TEXT twin. Each name
-- written as a BLOB is stored as the TEXT of its bytes, in the statement
-- that wrote it (a `unique_key` then held by another open row refuses the
-- statement, as the TEXT key would have).
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
           unique_key = CAST(unique_key AS TEXT),
           on_success = CAST(on_success AS TEXT), on_failure = CAST(on_failure AS TEXT)
     WHERE id = NEW.id;
END;

-- Rows already written so (a key whose TEXT twin is already stored is left
-- as it is: the upgrade must not fail on it).
UPDATE task_runner_requests
   SET task_class_name = CAST(task_class_name AS TEXT), queue = CAST(queue AS TEXT),
       node = CAST(node AS TEXT), not_node = CAST(not_node AS TEXT),
       unique_key = CASE WHEN typeof(unique_key) = 'blob'
                          AND NOT EXISTS (SELECT 1 FROM task_runner_requests AS twin
                                           WHERE twin.unique_key = CAST(task_runner_requests.unique_key AS TEXT))
                         THEN CAST(unique_key AS TEXT) ELSE unique_key END,
       on_success = CAST(on_success AS TEXT), on_failure = CAST(on_failure AS TEXT)
 WHERE typeof(task_class_name) = 'blob' OR typeof(queue) = 'blob'
    OR typeof(node) = 'blob' OR typeof(not_node) = 'blob'
    OR typeof(unique_key) = 'blob'
    OR typeof(on_success) = 'blob' OR typeof(on_failure) = 'blob';
