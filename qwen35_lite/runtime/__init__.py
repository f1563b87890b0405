"""Running a model: the engine (load under the plan), generation, sampling, chat sessions, stats, user files."""
