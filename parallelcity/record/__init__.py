"""What a run leaves behind: journal, reading it back, reports and plots."""
