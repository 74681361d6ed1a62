import type { AppError } from "./errors";

/**
 * Per isolate: what this isolate saw sold out (a product, a coupon), answered without asking its object
 * again for `markMs`. What comes back stays hidden from this isolate at most that long; the caller forgets
 * a mark at once where it knows better (it gave units back itself).
 *
 * One refusal per mark is thrown to every request it answers: errors are never mutated once built, and
 * building one (with its stack) per refusal was a visible share of a drop's CPU, where most requests end in it.
 */
export class SoldOutMarks {
  private readonly marks = new Map<number, { until: number; refusal: AppError }>();

  constructor(
    private readonly markMs: number,
    private readonly refusalFor: (id: number) => AppError,
  ) {}

  /** The refusal for `id` while it is marked, else null. */
  refusal(id: number): AppError | null {
    const mark = this.marks.get(id);
    if (mark === undefined) return null;
    if (Date.now() < mark.until) return mark.refusal;
    this.marks.delete(id);
    return null;
  }

  mark(id: number): void {
    this.marks.set(id, { until: Date.now() + this.markMs, refusal: this.refusalFor(id) });
  }

  forget(id: number): void {
    this.marks.delete(id);
  }
}
