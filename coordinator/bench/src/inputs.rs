//! Readers for the benchmark inputs in ../shared/bench (see its README).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};
use berth_coordinator::placement::scheduler::offline::Instance;

/// The most dimensions, and items, a `.vbp` instance may have.
const VBP_MAX_DIMS: usize = 64;
const VBP_MAX_ITEMS: u64 = 10_000_000;

/// A `.vbp` file: dimensions, capacities, item types with demands. Sizes are whole numbers,
/// capacities positive, and every item fits an empty bin (else no packing exists).
pub fn read_vbp(path: &Path) -> anyhow::Result<Instance> {
    let text = read_text(path)?;
    let mut numbers = text.split_whitespace().map(|t| {
        t.parse::<u64>()
            .with_context(|| format!("{}: {t:?} is not a number", path.display()))
    });
    let mut next = || {
        numbers
            .next()
            .unwrap_or_else(|| bail!("{}: ends early", path.display()))
    };
    let dims = next()? as usize;
    anyhow::ensure!(
        (1..=VBP_MAX_DIMS).contains(&dims),
        "{}: {dims} dimensions (1 to {VBP_MAX_DIMS})",
        path.display()
    );
    let capacity = (0..dims)
        .map(|_| next())
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(
        capacity.iter().all(|c| *c > 0),
        "{}: a bin capacity of 0",
        path.display()
    );
    let kinds = next()?;
    let mut items = Vec::new();
    for kind in 0..kinds {
        let sizes = (0..dims)
            .map(|_| next())
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(
            sizes.iter().zip(&capacity).all(|(s, c)| s <= c),
            "{}: item type {} ({sizes:?}) is larger than a bin ({capacity:?})",
            path.display(),
            kind + 1
        );
        let demand = next()?;
        anyhow::ensure!(
            items.len() as u64 + demand <= VBP_MAX_ITEMS,
            "{}: more than {VBP_MAX_ITEMS} items",
            path.display()
        );
        for _ in 0..demand {
            items.push(sizes.clone());
        }
    }
    Ok(Instance { capacity, items })
}

/// What the summary knows of an instance: (lower bound, optimum if known, best published).
pub type Known = (u64, Option<u64>, u64);

/// Per instance name, from Panigrahy_summary_known.csv.
pub fn read_summary(path: &Path) -> anyhow::Result<HashMap<String, Known>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut out = HashMap::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 4 {
            continue;
        }
        let opt: i64 = cols[2]
            .parse()
            .with_context(|| format!("OPT of {}", cols[0]))?;
        out.insert(
            cols[0].to_string(),
            (
                cols[1].parse()?,
                (opt > 0).then_some(opt as u64),
                cols[3].parse()?,
            ),
        );
    }
    Ok(out)
}

/// One VM of the Azure trace: arrival, departure (seconds), CPU (millicores), memory (MiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vm {
    pub arrive: u64,
    pub depart: u64,
    pub cpu: u64,
    pub mem: u64,
    /// Its flavour: the line of `flav_map.txt` that names it, from 0.
    pub flavour: u16,
    /// Its arrival batch: the VMs between two `|` of one line share one, numbered from 0
    /// through the file.
    pub batch: u32,
}

/// The largest trace file read (the shared one is a few MB).
const TRACE_FILE_BYTES: u64 = 256 << 20;

/// Which files of a trace directory to read, and when the trace ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// `NAME.txt`: arrivals.
    pub arrivals: String,
    /// `NAME.cEND.txt`: their durations, censored at `end`.
    pub durations: String,
    /// Seconds from the start; a VM still running then (`C<bin>`) departs at it.
    pub end: u64,
}

impl Trace {
    /// The trace in `dir`: `name` (or the only `NAME.txt` beside a `NAME.cEND.txt` there),
    /// ending at `end` (or the END its durations file is named with).
    pub fn find(dir: &Path, name: Option<&str>, end: Option<u64>) -> anyhow::Result<Self> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
            let file = entry?.file_name();
            let Some(file) = file.to_str() else { continue };
            let Some(stem) = file.strip_suffix(".txt") else {
                continue;
            };
            let Some((trace, censored)) = stem.rsplit_once(".c") else {
                continue;
            };
            let Ok(named_end) = censored.parse::<u64>() else {
                continue;
            };
            if dir.join(format!("{trace}.txt")).is_file() && name.is_none_or(|n| n == trace) {
                found.push(Trace {
                    arrivals: format!("{trace}.txt"),
                    durations: file.to_string(),
                    end: end.unwrap_or(named_end),
                });
            }
        }
        found.sort_by(|a, b| a.durations.cmp(&b.durations));
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => bail!(
                "{}: no trace{}: expected NAME.txt (arrivals) beside NAME.cEND.txt (durations censored at END seconds)",
                dir.display(),
                name.map(|n| format!(" named {n:?}")).unwrap_or_default()
            ),
            _ => bail!(
                "{}: several traces ({}): name one with --trace",
                dir.display(),
                found
                    .iter()
                    .map(|t| t.durations.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path).with_context(|| path.display().to_string())?;
    anyhow::ensure!(
        meta.len() <= TRACE_FILE_BYTES,
        "{}: larger than {TRACE_FILE_BYTES} bytes",
        path.display()
    );
    std::fs::read_to_string(path).with_context(|| path.display().to_string())
}

/// The VMs of `trace` in `dir`, the first `limit` of them. Every line and entry is checked:
/// the two files must list the same VMs at the same times, times must not go back or reach
/// the end, and every duration must be positive; an error names the file and line.
pub fn read_azure(dir: &Path, trace: &Trace, limit: Option<usize>) -> anyhow::Result<Vec<Vm>> {
    let read = |name: &str| read_text(&dir.join(name));
    let mut flavours = HashMap::new();
    for (n, line) in read("flav_map.txt")?.lines().enumerate() {
        let flavour = u16::try_from(n).context("flav_map.txt: more than 65,536 lines")?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("flav_map.txt line {}", n + 1);
        let (spec, letter) = line
            .split_once(' ')
            .with_context(|| format!("{}: expected `vCPU,GB LETTER`", at()))?;
        let (cpu, gb) = spec
            .split_once(',')
            .with_context(|| format!("{}: expected `vCPU,GB`", at()))?;
        let cpu: f64 = cpu.parse().with_context(at)?;
        let gb: f64 = gb.parse().with_context(at)?;
        anyhow::ensure!(
            cpu > 0.0 && gb > 0.0 && cpu.is_finite() && gb.is_finite(),
            "{}: a flavour needs a positive size",
            at()
        );
        flavours.insert(
            letter.trim().to_string(),
            ((cpu * 1000.0) as u64, (gb * 1024.0) as u64, flavour),
        );
    }
    // Bin b spans from its smallest lower bound to the next bin's; a VM lasts the midpoint.
    let mut lower: Vec<u64> = Vec::new();
    for (n, line) in read("v1.interval_map.txt")?.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("v1.interval_map.txt line {}", n + 1);
        let (secs, bin) = line
            .split_once(' ')
            .with_context(|| format!("{}: expected `SECONDS BIN`", at()))?;
        let (secs, bin): (u64, usize) = (
            secs.parse().with_context(at)?,
            bin.trim().parse().with_context(at)?,
        );
        anyhow::ensure!(bin < 100_000, "{}: bin {bin} is out of range", at());
        if bin >= lower.len() {
            lower.resize(bin + 1, u64::MAX);
        }
        lower[bin] = lower[bin].min(secs);
    }
    let bin_bounds = |bin: usize| -> Option<(u64, u64)> {
        let low = *lower.get(bin).filter(|l| **l != u64::MAX)?;
        let mid = match lower.get(bin + 1) {
            Some(high) if *high != u64::MAX => (low + high) / 2,
            _ => low,
        };
        Some((low, mid))
    };
    let arrivals = read(&trace.arrivals)?;
    let durations = read(&trace.durations)?;
    let (mut a_lines, mut d_lines) = (arrivals.lines(), durations.lines());
    let mut vms = Vec::new();
    let mut previous = 0;
    let mut batch = 0u32;
    for n in 1.. {
        let (a, d) = match (a_lines.next(), d_lines.next()) {
            (None, None) => break,
            (Some(a), Some(d)) => (a, d),
            _ => bail!(
                "{} and {}: line {n}: one file ends here, the other does not",
                trace.arrivals,
                trace.durations
            ),
        };
        let at = |file: &str| format!("{file} line {n}");
        let (t, seq) = a
            .split_once(' ')
            .with_context(|| format!("{}: expected `TIMESTAMP SEQ`", at(&trace.arrivals)))?;
        let (dt, dseq) = d
            .split_once(' ')
            .with_context(|| format!("{}: expected `TIMESTAMP SEQ`", at(&trace.durations)))?;
        let t: u64 = t.parse().with_context(|| at(&trace.arrivals))?;
        anyhow::ensure!(
            dt.parse::<u64>().ok() == Some(t),
            "{}: timestamp {dt} where {} has {t}",
            at(&trace.durations),
            trace.arrivals
        );
        anyhow::ensure!(
            t >= previous,
            "{}: timestamp {t} is before the previous line's {previous}",
            at(&trace.arrivals)
        );
        anyhow::ensure!(
            t < trace.end,
            "{}: timestamp {t} is not before the trace's end {} (name the end with --trace-end)",
            at(&trace.arrivals),
            trace.end
        );
        previous = t;
        let (flavours_here, durations_here): (Vec<&str>, Vec<&str>) =
            (seq.split(',').collect(), dseq.split(',').collect());
        anyhow::ensure!(
            flavours_here.len() == durations_here.len(),
            "{}: {} entries where {} has {}",
            at(&trace.durations),
            durations_here.len(),
            trace.arrivals,
            flavours_here.len()
        );
        // A line's first batch is a new one, whether or not the last line ended with `|`.
        let mut batch_has_vms = false;
        if vms.last().is_some_and(|v: &Vm| v.batch == batch) {
            batch += 1;
        }
        for (f, d) in flavours_here.into_iter().zip(durations_here) {
            if f == "|" || f.is_empty() {
                if batch_has_vms {
                    batch += 1;
                    batch_has_vms = false;
                }
                continue;
            }
            let &(cpu, mem, flavour) = flavours
                .get(f)
                .with_context(|| format!("{}: unknown flavour {f:?}", at(&trace.arrivals)))?;
            let (kind, bin) = d.split_at_checked(1).unwrap_or((d, ""));
            let bin: usize = bin.parse().with_context(|| {
                format!(
                    "{}: duration {d:?}: expected U<bin> or C<bin>",
                    at(&trace.durations)
                )
            })?;
            let (low, mid) = bin_bounds(bin).with_context(|| {
                format!(
                    "{}: duration {d:?}: bin {bin} is not in v1.interval_map.txt",
                    at(&trace.durations)
                )
            })?;
            let depart = match kind {
                // Finished before the end: it cannot have lasted less than its bin's lower
                // bound or past the end; it lasts the bin's midpoint, within the end.
                "U" => {
                    anyhow::ensure!(
                        mid > 0 && t + low <= trace.end,
                        "{}: duration {d:?} ({low} s or more, {mid} s taken) does not fit between {t} and the trace's end {}",
                        at(&trace.durations),
                        trace.end
                    );
                    (t + mid).min(trace.end)
                }
                "C" => trace.end,
                _ => bail!(
                    "{}: duration {d:?}: expected U<bin> or C<bin>",
                    at(&trace.durations)
                ),
            };
            vms.push(Vm {
                arrive: t,
                depart,
                cpu,
                mem,
                flavour,
                batch,
            });
            batch_has_vms = true;
            if limit.is_some_and(|l| vms.len() >= l) {
                return Ok(vms);
            }
        }
    }
    Ok(vms)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trace directory: two flavours, bins 0 (100 s), 1 (1,000 s), 2 (10,000 s).
    fn trace_dir(arrivals: &str, durations_name: &str, durations: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("flav_map.txt", "1,2 a\n4,16 b\n");
        write("v1.interval_map.txt", "100 0\n1000 1\n10000 2\n");
        write("t.txt", arrivals);
        write(durations_name, durations);
        dir
    }

    fn read(dir: &tempfile::TempDir) -> anyhow::Result<Vec<Vm>> {
        let trace = Trace::find(dir.path(), None, None)?;
        read_azure(dir.path(), &trace, None)
    }

    #[test]
    fn a_trace_is_found_by_its_names_and_ends_where_its_durations_file_says() {
        let dir = trace_dir("10 a,|,b\n50 a\n", "t.c5000.txt", "10 U0,|,C2\n50 U1\n");
        let trace = Trace::find(dir.path(), None, None).unwrap();
        assert_eq!(trace.end, 5_000);
        assert_eq!(trace.durations, "t.c5000.txt");
        let vm = |arrive, depart, cpu, mem, flavour, batch| Vm {
            arrive,
            depart,
            cpu,
            mem,
            flavour,
            batch,
        };
        assert_eq!(
            read(&dir).unwrap(),
            [
                // U0: the midpoint of bin 0 (100 to 1,000 s); C: until the end. `|` ends a
                // batch, and so does a line.
                vm(10, 560, 1_000, 2_048, 0, 0),
                vm(10, 5_000, 4_000, 16_384, 1, 1),
                vm(50, 5_000, 1_000, 2_048, 0, 2),
            ]
        );
        // --trace-end replaces the named end.
        assert_eq!(
            Trace::find(dir.path(), None, Some(9_000)).unwrap().end,
            9_000
        );
    }

    #[test]
    fn a_trace_that_makes_no_sense_is_refused_by_file_and_line() {
        for (arrivals, durations, message) in [
            // Starts after its end: every VM would leave before it came.
            (
                "6000 a\n",
                "6000 U0\n",
                "t.txt line 1: timestamp 6000 is not before the trace's end 5000",
            ),
            (
                "10 a\n5 a\n",
                "10 U0\n5 U0\n",
                "t.txt line 2: timestamp 5 is before",
            ),
            (
                "10 a\n",
                "11 U0\n",
                "t.c5000.txt line 1: timestamp 11 where t.txt has 10",
            ),
            (
                "10 a,a\n",
                "10 U0\n",
                "t.c5000.txt line 1: 1 entries where t.txt has 2",
            ),
            ("10 a\n20 a\n", "10 U0\n", "line 2: one file ends here"),
            ("10 a\n", "10 U7\n", "bin 7 is not in v1.interval_map.txt"),
            ("10 a\n", "10 X0\n", "expected U<bin> or C<bin>"),
            ("10 z\n", "10 U0\n", "unknown flavour \"z\""),
            (
                "4500 a\n",
                "4500 U1\n",
                "duration \"U1\" (1000 s or more, 5500 s taken) does not fit between 4500 and the trace's end 5000",
            ),
        ] {
            let dir = trace_dir(arrivals, "t.c5000.txt", durations);
            let err = format!("{:#}", read(&dir).unwrap_err());
            assert!(err.contains(message), "{arrivals:?}: {err}");
        }
        let none = tempfile::tempdir().unwrap();
        let err = Trace::find(none.path(), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expected NAME.txt (arrivals) beside NAME.cEND.txt"),
            "{err}"
        );
        let two = trace_dir("10 a\n", "t.c5000.txt", "10 U0\n");
        std::fs::write(two.path().join("u.txt"), "10 a\n").unwrap();
        std::fs::write(two.path().join("u.c9000.txt"), "10 U0\n").unwrap();
        let err = Trace::find(two.path(), None, None).unwrap_err().to_string();
        assert!(
            err.contains("several traces (t.c5000.txt, u.c9000.txt)"),
            "{err}"
        );
        assert_eq!(Trace::find(two.path(), Some("u"), None).unwrap().end, 9_000);
    }

    #[test]
    fn a_vbp_file_with_a_size_that_is_no_size_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for (text, message) in [
            ("2\n10 10\n1\n-2 3 4\n", "\"-2\" is not a number"),
            (
                "2\n10 10\n1\n11 3 4\n",
                "item type 1 ([11, 3]) is larger than a bin",
            ),
            ("0\n1\n", "0 dimensions"),
            ("2\n10 0\n1\n1 0 1\n", "a bin capacity of 0"),
            ("2\n10 10\n2\n1 1 1\n", "ends early"),
        ] {
            let path = dir.path().join("x.vbp");
            std::fs::write(&path, text).unwrap();
            let err = read_vbp(&path).unwrap_err().to_string();
            assert!(err.contains(message), "{text:?}: {err}");
        }
        let path = dir.path().join("ok.vbp");
        std::fs::write(&path, "2\n10 10\n2\n1 2 3\n4 5 1\n").unwrap();
        let inst = read_vbp(&path).unwrap();
        assert_eq!(inst.capacity, [10, 10]);
        assert_eq!(inst.items.len(), 4);
    }
}
