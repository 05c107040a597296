# A request for taskrunner: create one and a daemon runs it in its own
# process, then records the outcome on the row.
#
#   TaskRunnerRequest.enqueue("WordCount", { input: "README.md", top: 5 }, delay: 10.seconds, try_limit: 3)
#   TaskRunnerRequest.find(id).finished?
#
# Options are stored as YAML; Ruby's symbol keys (`:input:`) and
# `!ruby/hash:…` tags are read by taskrunner like plain YAML keys.
class TaskRunnerRequest < ApplicationRecord
  # States that end a request for good; FAILED, CRASHED and TIMEOUT end it
  # only once tries reach try_limit.
  FINAL = %w[FINISHED CANCELLED REJECTED].freeze
  RETRYABLE = %w[FAILED CRASHED TIMEOUT INTERRUPTED].freeze

  # Symbol keys are written as `:key:`; reading them back in Ruby needs
  # `config.active_record.yaml_column_permitted_classes = [Symbol]`
  # (or plain string keys: `enqueue("WordCount", { "input" => "a.txt" })`).
  # ActiveRecord 7.1 takes the coder as `coder:`; 6.1 and 7.0 positionally.
  if ActiveRecord.version >= Gem::Version.new("7.1")
    serialize :options, coder: YAML
  else
    serialize :options, YAML
  end

  validates :task_class_name, presence: true

  scope :pending, -> { where(result: nil) }
  scope :running, -> { where(result: "RUNNING") }
  scope :finished, -> { where(result: "FINISHED") }
  scope :failed, -> { where(result: %w[FAILED CRASHED TIMEOUT REJECTED]) }
  scope :runnable, lambda {
    where(pid: nil, result: [nil, *RETRYABLE])
      .where("tries < try_limit")
      .where("delay_until IS NULL OR delay_until <= ?", Time.now.utc)
  }

  # Inserts a request (inside the caller's transaction, if any).
  def self.enqueue(task, options = nil, delay: nil, try_limit: nil, priority: nil)
    create!(
      task_class_name: task,
      options: options.presence,
      delay_until: delay && Time.now.utc + delay,
      **{ try_limit: try_limit, priority: priority }.compact
    )
  end

  def finished?
    result == "FINISHED"
  end

  # Final, or out of tries: taskrunner will not run it again by itself.
  def done?
    FINAL.include?(result) || (RETRYABLE.include?(result) && result != "INTERRUPTED" && tries >= try_limit)
  end

  # Makes the request run again (what `taskrunner-cli retry` does); refused while it runs.
  def retry!
    raise "request #{id} is running" if result == "RUNNING"
    update!(pid: nil, result: nil, tries: 0, delay_until: nil)
  end
end
