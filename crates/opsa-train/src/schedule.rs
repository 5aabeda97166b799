//! Learning-rate schedule: linear warmup from 0, then cosine decay to `min_ratio · lr`.

/// Learning rate at optimiser step `step` (0-based) of `total`.
pub fn cosine_with_warmup(step: usize, total: usize, lr: f64, warmup: usize, min_ratio: f64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    let min = lr * min_ratio;
    min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Warmup steps for a ratio of the total (at least one when the ratio is positive).
pub fn warmup_steps(total: usize, ratio: f64) -> usize {
    if ratio <= 0.0 {
        0
    } else {
        ((total as f64 * ratio).round() as usize).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let (total, lr) = (100, 1e-3);
        let w = warmup_steps(total, 0.1);
        assert_eq!(w, 10);
        assert!((cosine_with_warmup(0, total, lr, w, 0.0) - 1e-4).abs() < 1e-12);
        assert!((cosine_with_warmup(9, total, lr, w, 0.0) - lr).abs() < 1e-12);
        assert!((cosine_with_warmup(10, total, lr, w, 0.0) - lr).abs() < 1e-12);
        assert!((cosine_with_warmup(55, total, lr, w, 0.0) - lr / 2.0).abs() < 1e-12);
        assert!(cosine_with_warmup(99, total, lr, w, 0.1) > 1e-4 - 1e-12);
        let lrs: Vec<f64> = (w..total).map(|s| cosine_with_warmup(s, total, lr, w, 0.0)).collect();
        assert!(lrs.windows(2).all(|p| p[1] <= p[0]));
    }
}
