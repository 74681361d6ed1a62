// A D1 binding that fails on command: an outage injected from the test, never a flag in production code.
// Statements prepared through it are its own wrappers, so a failure can be aimed at one SQL statement
// (say, only the write that records SENT) while the rest of the code runs against the real database.

export interface UnreliableD1 {
  db: D1Database;
  /** Fails the next `count` calls (first/run/all/raw or a batch) whose SQL matches `sql` (any, if omitted). */
  failNext(count: number, sql?: RegExp): void;
  /** Fails every call until `up()`. */
  down(): void;
  up(): void;
  /** How many calls failed so far. */
  readonly failures: number;
}

export function unreliableD1(real: D1Database): UnreliableD1 {
  let remaining = 0;
  let matching: RegExp | undefined;
  let outage = false;
  let failures = 0;

  const check = (sql: string) => {
    const hit = outage || (remaining > 0 && (!matching || matching.test(sql)));
    if (!hit) return;
    if (!outage) remaining--;
    failures++;
    throw new Error("D1_ERROR: injected outage");
  };

  class Statement {
    constructor(
      readonly real: D1PreparedStatement,
      readonly sql: string,
    ) {}
    bind(...values: unknown[]) {
      return new Statement(this.real.bind(...values), this.sql);
    }
    async first(column?: string) {
      check(this.sql);
      return column === undefined ? this.real.first() : this.real.first(column);
    }
    async run() {
      check(this.sql);
      return this.real.run();
    }
    async all() {
      check(this.sql);
      return this.real.all();
    }
    async raw() {
      check(this.sql);
      return this.real.raw();
    }
  }

  const db = {
    prepare: (sql: string) => new Statement(real.prepare(sql), sql),
    batch: async (statements: Statement[]) => {
      check(statements.map((s) => s.sql).join(";\n"));
      return real.batch(statements.map((s) => s.real));
    },
  } as unknown as D1Database;

  return {
    db,
    failNext(count, sql) {
      remaining = count;
      matching = sql;
    },
    down() {
      outage = true;
    },
    up() {
      outage = false;
    },
    get failures() {
      return failures;
    },
  };
}
