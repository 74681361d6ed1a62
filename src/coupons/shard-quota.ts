// A shard's quota and the records that move it between shards, in the shard's own storage.
//
// A transfer moves pieces from a giver's quota to a taker's in three steps, each one storage transaction:
//   1. the taker records an intent (transfer id, giver) before it asks: the output gate holds the request
//      until that write is durable, so no giver ever hears of a transfer its taker could forget;
//   2. the giver takes the pieces off its quota and records (id, taker, pieces) in the same transaction, and
//      answers with the pieces; asked again with the same id, it answers the same pieces and takes nothing.
//      Asked first by a resolution (need 0), it records the id with 0 pieces: a late ask gets nothing.
//   3. the taker adds the pieces to its quota and deletes the intent in one transaction, only if the intent
//      is still open: a piece is credited once.
// Between 2 and 3 the pieces are in transit: off the giver's quota, named by its record and by the taker's
// open intent, which the taker resolves (asks again with need 0) at its next request, or from its alarm.
// So sum(quota) + in transit = totalQuantity at every step, whatever step a crash interrupts.

export interface OpenIntent {
  transfer_id: string;
  giver: number;
}

export class ShardQuota {
  private readonly sql: SqlStorage;

  constructor(private readonly storage: DurableObjectStorage) {
    this.sql = storage.sql;
    this.sql.exec(`CREATE TABLE IF NOT EXISTS quota (
      id INTEGER PRIMARY KEY CHECK (id = 0), coupon_id INTEGER NOT NULL, shard INTEGER NOT NULL,
      pieces INTEGER NOT NULL CHECK (pieces >= 0))`);
    this.sql.exec(`CREATE TABLE IF NOT EXISTS given (
      transfer_id TEXT PRIMARY KEY, taker INTEGER NOT NULL, pieces INTEGER NOT NULL CHECK (pieces >= 0))`);
    this.sql.exec("CREATE TABLE IF NOT EXISTS intents (transfer_id TEXT PRIMARY KEY, giver INTEGER NOT NULL)");
  }

  /** The pieces this shard may admit in all (issued, pending and free); null before the shard started. */
  pieces(): number | null {
    return this.sql.exec<{ pieces: number }>("SELECT pieces FROM quota").toArray()[0]?.pieces ?? null;
  }

  /** Which coupon and shard this object serves, once started (its alarm has no request to learn it from). */
  identity(): { couponId: number; shard: number } | null {
    const row = this.sql.exec<{ coupon_id: number; shard: number }>("SELECT coupon_id, shard FROM quota").toArray()[0];
    return row ? { couponId: row.coupon_id, shard: row.shard } : null;
  }

  /** A shard's first quota. Never rewritten: only transfers change it afterwards. */
  start(couponId: number, shard: number, pieces: number): void {
    this.sql.exec("INSERT OR IGNORE INTO quota (id, coupon_id, shard, pieces) VALUES (0, ?, ?, ?)", couponId, shard, pieces);
  }

  /** D1 says the coupon is sold out: keep only what is issued or pending here. */
  shrinkTo(pieces: number): void {
    this.sql.exec("UPDATE quota SET pieces = min(pieces, ?)", pieces);
  }

  /** Step 2, on the giver: idempotent by transfer id. `free` is what it holds beyond its admissions. */
  give(transferId: string, taker: number, need: number, free: number): number {
    const known = this.sql
      .exec<{ pieces: number }>("SELECT pieces FROM given WHERE transfer_id = ?", transferId)
      .toArray()[0];
    if (known) return known.pieces;
    const pieces = Math.max(0, Math.min(need, free));
    this.storage.transactionSync(() => {
      this.sql.exec("UPDATE quota SET pieces = pieces - ?", pieces);
      this.sql.exec("INSERT INTO given (transfer_id, taker, pieces) VALUES (?, ?, ?)", transferId, taker, pieces);
    });
    return pieces;
  }

  /** Step 1, on the taker. */
  openIntent(giver: number): string {
    const transferId = crypto.randomUUID();
    this.sql.exec("INSERT INTO intents (transfer_id, giver) VALUES (?, ?)", transferId, giver);
    return transferId;
  }

  /** Step 3, on the taker: false when the intent was already settled (the pieces were credited then). */
  credit(transferId: string, pieces: number): boolean {
    return this.storage.transactionSync(() => {
      const open = this.sql.exec("DELETE FROM intents WHERE transfer_id = ? RETURNING giver", transferId).toArray();
      if (open.length === 0) return false;
      this.sql.exec("UPDATE quota SET pieces = pieces + ?", pieces);
      return true;
    });
  }

  /** Transfers this shard gave pieces in, and how many pieces. */
  givenSoFar(): { transfers: number; pieces: number } {
    return this.sql
      .exec<{ transfers: number; pieces: number }>(
        "SELECT count(*) AS transfers, coalesce(sum(pieces), 0) AS pieces FROM given WHERE pieces > 0",
      )
      .one();
  }

  openIntents(): OpenIntent[] {
    return this.sql.exec<{ transfer_id: string; giver: number }>("SELECT transfer_id, giver FROM intents").toArray();
  }
}
