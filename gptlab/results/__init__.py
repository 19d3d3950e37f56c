"""Reading runs back: runs into a DataFrame (frame), comparison tables (compare) and their
statistics (stats), terminal and file plots (termplot, plots) and the HTML report (report)."""
