-- Demo data for `npm start`. Fixed ids and INSERT OR IGNORE make it idempotent: a second run adds nothing.
-- Every balance is backed by a CHARGE ledger row, so balance == sum(ledger) holds from the start.
INSERT OR IGNORE INTO users (id, name, balance, created_at, updated_at) VALUES
  (1, 'Demo Kim', 500000, '2026-11-01T00:00:00.000Z', '2026-11-01T00:00:00.000Z'),
  (2, 'Demo Lee', 200000, '2026-11-01T00:00:01.000Z', '2026-11-01T00:00:01.000Z'),
  (3, 'Demo Park', 0, '2026-11-01T00:00:02.000Z', '2026-11-01T00:00:02.000Z');

INSERT OR IGNORE INTO wallet_transactions (id, user_id, type, amount, balance_after, order_id, created_at) VALUES
  (1, 1, 'CHARGE', 500000, 500000, NULL, '2026-11-01T00:00:00.000Z'),
  (2, 2, 'CHARGE', 200000, 200000, NULL, '2026-11-01T00:00:01.000Z');

INSERT OR IGNORE INTO products (id, name, price, stock, created_at, updated_at) VALUES
  (1, 'Americano beans 1kg', 32000, 100, '2026-11-01T00:00:00.000Z', '2026-11-01T00:00:00.000Z'),
  (2, 'Ceramic mug', 12000, 50, '2026-11-01T00:00:01.000Z', '2026-11-01T00:00:01.000Z'),
  (3, 'Pour-over dripper', 25000, 30, '2026-11-01T00:00:02.000Z', '2026-11-01T00:00:02.000Z'),
  (4, 'Paper filters x100', 4500, 500, '2026-11-01T00:00:03.000Z', '2026-11-01T00:00:03.000Z'),
  (5, 'Hand grinder', 89000, 10, '2026-11-01T00:00:04.000Z', '2026-11-01T00:00:04.000Z'),
  (6, 'Kettle', 59000, 20, '2026-11-01T00:00:05.000Z', '2026-11-01T00:00:05.000Z');

INSERT OR IGNORE INTO coupons (id, name, discount_type, discount_value, min_order_amount, total_quantity, issued_count,
  issue_starts_at, issue_ends_at, valid_days, created_at) VALUES
  (1, 'Welcome 5,000 won off', 'FIXED', 5000, 20000, 100, 0, NULL, NULL, 30, '2026-11-01T00:00:00.000Z'),
  (2, 'Black Friday 10%', 'PERCENT', 10, 0, 10, 0, NULL, NULL, 7, '2026-11-01T00:00:01.000Z');
