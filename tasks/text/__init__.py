"""Text family tasks: corpus, n-gram, neural LMs, their comparison and sentence scoring."""
