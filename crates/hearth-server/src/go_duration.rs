//! Go's duration syntax (`time.ParseDuration`), which Replicate's `Cancel-After`
//! header takes: `500ms`, `30s`, `1m30s`, `1.5h`.

use std::time::Duration;

/// A positive duration, or why not.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty".into());
    }
    if s.starts_with('-') {
        return Err(format!("{s:?} is negative"));
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(num_len);
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return Err(format!("{s:?} is not a duration like 500ms, 30s or 1m30s"));
        }
        let value: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration like 500ms, 30s or 1m30s"))?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("{s:?}: a unit is missing (ns, us, ms, s, m or h)")),
            other => {
                return Err(format!(
                    "{s:?}: unknown unit {other:?} (ns, us, ms, s, m or h)"
                ))
            }
        };
        total += value * scale;
        rest = next;
    }
    if !(total.is_finite()) || total > 1e9 {
        return Err(format!("{s:?} is too long"));
    }
    if total <= 0.0 {
        return Err(format!("{s:?} is not positive"));
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::parse;
    use std::time::Duration;

    #[test]
    fn go_durations() {
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse("2h45m0.5s").unwrap(),
            Duration::from_millis(9_900_500)
        );
        assert_eq!(parse("100us").unwrap(), Duration::from_micros(100));
        for bad in ["", "30", "-5s", "0s", "abc", "5x", "1..5s", "s", "5 s"] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
