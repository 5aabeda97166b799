//! Small statistics for the findings: Spearman's rank correlation, mean and spread over seeds,
//! and the mean per-token negative log-likelihood of a dataset (DGR's distribution gap).

/// Ranks (1-based), ties given the mean of the ranks they span.
pub fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = mean_rank;
        }
        i = j + 1;
    }
    r
}

/// Pearson's correlation; `None` with fewer than two points or when either side is constant.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.len() < 2 || x.iter().chain(y).any(|v| !v.is_finite()) {
        return None;
    }
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// Spearman's ρ: Pearson's correlation of the ranks (ties averaged); `None` when undefined
/// (fewer than two points, one side constant, or a value that is not finite).
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.iter().chain(y).any(|v| !v.is_finite()) {
        return None;
    }
    pearson(&ranks(x), &ranks(y))
}

/// Mean and sample standard deviation (0 for one value); `None` for no values.
pub fn mean_sd(v: &[f64]) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 { (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    Some((m, sd))
}

/// Mean per-token negative log-likelihood (nats) over a dataset, from each example's response
/// token log-probabilities: every token weighs the same, whatever its example's length.
pub fn mean_nll(logprobs: &[Vec<f32>]) -> Option<f64> {
    let tokens: usize = logprobs.iter().map(Vec::len).sum();
    (tokens > 0).then(|| -logprobs.iter().flatten().map(|&x| x as f64).sum::<f64>() / tokens as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_on_fixed_numbers() {
        // Monotone but not linear: ρ = 1 (Pearson would not be).
        assert_eq!(spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 4.0, 9.0, 100.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        // Ties take the mean rank: x ranks [1, 2.5, 2.5, 4].
        assert_eq!(ranks(&[0.1, 0.5, 0.5, 0.9]), vec![1.0, 2.5, 2.5, 4.0]);
        // Worked by hand: x = [1, 2, 3, 4, 5], y = [2, 1, 4, 3, 5]: d² = 1+1+1+1+0 = 4,
        // ρ = 1 − 6·4 / (5·24) = 0.8.
        let r = spearman(&[1.0, 2.0, 3.0, 4.0, 5.0], &[2.0, 1.0, 4.0, 3.0, 5.0]).unwrap();
        assert!((r - 0.8).abs() < 1e-12, "{r}");
        // With ties (scipy.stats.spearmanr([1,2,2,3],[1,3,2,4]) = 0.9486832980505138).
        let r = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]).unwrap();
        assert!((r - 0.948_683_298_050_513_8).abs() < 1e-12, "{r}");
        // Undefined: constant side, one point, NaN.
        assert_eq!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
        assert_eq!(spearman(&[1.0], &[1.0]), None);
        assert_eq!(spearman(&[1.0, f64::NAN], &[1.0, 2.0]), None);
    }

    #[test]
    fn mean_sd_and_nll_on_fixed_numbers() {
        let (m, sd) = mean_sd(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!((m, sd), (2.0, 1.0));
        assert_eq!(mean_sd(&[5.0]), Some((5.0, 0.0)));
        assert_eq!(mean_sd(&[]), None);
        // Token-weighted, not example-weighted: (1 + 1 + 1 + 3) / 4 = 1.5 (the example means
        // 1.0 and 3.0 would average to 2.0).
        let nll = mean_nll(&[vec![-1.0, -1.0, -1.0], vec![-3.0]]).unwrap();
        assert!((nll - 1.5).abs() < 1e-12, "{nll}");
        assert_eq!(mean_nll(&[vec![], vec![]]), None);
    }
}
