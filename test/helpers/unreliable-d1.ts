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

  const db = interceptedD1(real, (call) => check(call.sql));

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

/** One call made through an intercepted D1: a statement's first/run/all/raw, or a batch (one call, whatever it holds). */
export interface D1Call {
  kind: "first" | "run" | "all" | "raw" | "batch";
  sql: string;
  statements: number;
}

/**
 * A D1 whose statements are its own wrappers around the real ones: `before` sees every call first (and may
 * throw, failing it), then the real database runs it.
 */
export function interceptedD1(real: D1Database, before: (call: D1Call) => void): D1Database {
  class Statement {
    constructor(
      readonly real: D1PreparedStatement,
      readonly sql: string,
    ) {}
    bind(...values: unknown[]) {
      return new Statement(this.real.bind(...values), this.sql);
    }
    async first(column?: string) {
      before({ kind: "first", sql: this.sql, statements: 1 });
      return column === undefined ? this.real.first() : this.real.first(column);
    }
    async run() {
      before({ kind: "run", sql: this.sql, statements: 1 });
      return this.real.run();
    }
    async all() {
      before({ kind: "all", sql: this.sql, statements: 1 });
      return this.real.all();
    }
    async raw() {
      before({ kind: "raw", sql: this.sql, statements: 1 });
      return this.real.raw();
    }
  }
  return {
    prepare: (sql: string) => new Statement(real.prepare(sql), sql),
    batch: async (statements: Statement[]) => {
      before({ kind: "batch", sql: statements.map((s) => s.sql).join(";\n"), statements: statements.length });
      return real.batch(statements.map((s) => s.real));
    },
  } as unknown as D1Database;
}
