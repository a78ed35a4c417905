// The fault-injection module: see README.md beside this file.
