#!/usr/bin/env python3
"""Rewrites drizzle-kit's SQLite table rebuilds into an order D1 accepts on tables that hold rows.

drizzle-kit rebuilds a table as: CREATE __new_t; INSERT INTO __new_t SELECT FROM t; DROP t; RENAME
__new_t TO t, wrapped in PRAGMA foreign_keys=OFF/ON. D1 runs a migration as one transaction with
foreign keys enforced, where foreign_keys=OFF does nothing: dropping a parent table counts its
children as violations, and only rows inserted into a table of that very name clear them. So each
rebuild becomes: copy aside, drop, create under the real name, insert back, drop the copy; with the
checks deferred to the commit. drizzle-kit also selects newly added columns from the old table; those
are left to their defaults.

Usage: python3 scripts/migrations/reorder-rebuilds.py migrations/NNNN_name.sql added_column,another
"""
import re
import sys

path = sys.argv[1]
sql = open(path).read()
sql = sql.replace("PRAGMA foreign_keys=OFF;--> statement-breakpoint\n", "")
sql = sql.replace("PRAGMA foreign_keys=ON;--> statement-breakpoint\n", "")

for table in re.findall(r"CREATE TABLE `__new_(\w+)`", sql):
    new = f"__new_{table}"
    create = re.search(r"CREATE TABLE `%s` \((.*?)\n\);\n--> statement-breakpoint\n" % new, sql, re.S)
    body = create.group(1).replace(f'"{new}".', f'"{table}".')
    insert = re.search(r"INSERT INTO `%s`\((.*?)\) SELECT (.*?) FROM `%s`;(?:--> statement-breakpoint)?\n" % (new, table), sql)
    rename = re.search(r"ALTER TABLE `%s` RENAME TO `%s`;--> statement-breakpoint\n" % (new, table), sql)
    # Columns the old table lacks are the ones this migration adds: they take their defaults.
    added = set(sys.argv[2].split(",")) if len(sys.argv) > 2 else set()
    columns = [c for c in insert.group(1).split(", ") if c.strip('"') not in added]
    block = (
        f"CREATE TABLE `__copy_{table}` AS SELECT * FROM `{table}`;--> statement-breakpoint\n"
        f"DROP TABLE `{table}`;--> statement-breakpoint\n"
        f"CREATE TABLE `{table}` ({body}\n);\n--> statement-breakpoint\n"
        f"INSERT INTO `{table}`({', '.join(columns)}) SELECT {', '.join(columns)} FROM `__copy_{table}`;--> statement-breakpoint\n"
        f"DROP TABLE `__copy_{table}`;--> statement-breakpoint\n"
    )
    sql = sql[: create.start()] + block + sql[rename.end() :]

explanation = __doc__.strip().split("\n\nUsage")[0].splitlines()
header = "\n".join("-- " + line if line else "--" for line in explanation) + "\n"
open(path, "w").write(header + "PRAGMA defer_foreign_keys = on;--> statement-breakpoint\n" + sql)
