"""Each paper's experiment in the miniature world: its conditions, tables and plots, run by `<paper>.py miniature`
and by reproduce.py. The paper files hold the method; these modules hold what the miniature run compares."""
