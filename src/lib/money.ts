// Money is an integer number of won everywhere. This is the one place a discount is computed.

export type DiscountType = "FIXED" | "PERCENT";

export interface Discount {
  discountType: DiscountType;
  discountValue: number;
  /** PERCENT only: the discount never passes it. */
  maxDiscountAmount?: number | null;
}

/**
 * FIXED: min(value, total); PERCENT: floor(total * value / 100), then at most maxDiscountAmount when the
 * coupon has one. Never more than the total.
 */
export function discountFor(discount: Discount, total: number): number {
  if (!Number.isSafeInteger(total) || total < 0) throw new RangeError(`total must be a non-negative integer: ${total}`);
  if (discount.discountType === "FIXED") return Math.min(discount.discountValue, total);
  const percent = Math.floor((total * discount.discountValue) / 100);
  return discount.maxDiscountAmount == null ? percent : Math.min(percent, discount.maxDiscountAmount);
}
