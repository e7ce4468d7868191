"""The admin API: keys created at run time (stored hashed in the ledger's database), usage and budgets."""
