# An example task: counts the words of `text` and returns the `top` most
# frequent ones. See lib/task_runner_task.rb for how taskrunner runs it.
class WordCountTask
  def initialize(options)
    @text = options.fetch("text") { raise ArgumentError, "option `text` is required" }
    @top = Integer(options.fetch("top", 3))
  end

  # Reports progress on standard error; taskrunner keeps the latest line.
  def progress(text)
    $stderr.puts "progress: #{text}"
  end

  def run
    progress "counting"
    counts = @text.downcase.scan(/[[:alnum:]']+/).tally
    counts.sort_by { |word, n| [-n, word] }.first(@top).map { |word, n| "#{word} #{n}" }.join(", ")
  end
end
