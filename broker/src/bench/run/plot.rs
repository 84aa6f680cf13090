//! `--plot FILE.svg`: the run's timeline as an SVG — throughput above (sent and received
//! messages per second), latency below (p50, p99 and max of each interval's deliveries, on a
//! log scale: a stall's seconds and a steady state's fractions of a millisecond on one axis),
//! the ramp and the drain shaded, the scenario in the title.
//!
//! Drawn with `plotters`' SVG backend alone: text stays `<text>` for the viewer to set, so
//! the generator needs no font files. The file is checked before the run (a directory that
//! does not exist is bad input, exit 2) and written whole at the end (a temporary file in the
//! same directory, renamed), so a failed run never leaves half a plot.

use std::io::Write;
use std::ops::Range;
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::settings::{Rate, Settings};
use super::timeline::{Point, Timeline};

/// The picture's size in pixels.
const SIZE: (u32, u32) = (1100, 760);
const SENT: RGBColor = RGBColor(31, 119, 180);
const RECEIVED: RGBColor = RGBColor(255, 127, 14);
const P50: RGBColor = RGBColor(44, 160, 44);
const P99: RGBColor = RGBColor(214, 39, 40);
const MAX: RGBColor = RGBColor(148, 103, 189);
/// The ramp and the drain: shaded, so that the publishing window stands out.
const SHADE: RGBColor = RGBColor(232, 232, 232);
/// Where publishing starts and ends.
const BOUNDARY: RGBColor = RGBColor(150, 150, 150);
/// The grid: decades and round numbers, and the finer lines between them.
const GRID: RGBColor = RGBColor(215, 215, 215);
const GRID_LIGHT: RGBColor = RGBColor(244, 244, 244);
/// The log axis' lines at 1 to 9 of each decade.
const GRID_LOG: RGBColor = RGBColor(232, 232, 232);
const FONT: &str = "sans-serif";
/// Pixels between a phase's name and the chart below it: clear of the top tick's label.
const LABEL_GAP: i32 = 9;
/// Room right of the charts: a short drain's name is written there.
const RIGHT_MARGIN: i32 = 50;
/// Font sizes as plotters takes them (it writes 1/1.24 of them into the SVG).
const TITLE: f64 = 28.0;
const SUBTITLE: f64 = 19.0;
const AXIS: f64 = 19.0;
const LABEL: f64 = 17.0;

/// Refuses a plot path that cannot be written, before the run: its directory must exist and
/// take a new file, and an existing file must be writable.
pub(super) fn check_path(path: &Path) -> anyhow::Result<()> {
    let shown = path.display();
    if path.as_os_str().is_empty() || path.file_name().is_none() {
        bail!("--plot `{shown}`: name a file, e.g. `run.svg`");
    }
    let dir = directory_of(path);
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => bail!("--plot `{shown}`: `{}` is not a directory", dir.display()),
        Err(e) => bail!(
            "--plot `{shown}`: the directory `{}` cannot be used: {e}",
            dir.display()
        ),
    }
    if path.is_dir() {
        bail!("--plot `{shown}` is a directory; name a file, e.g. `{shown}/run.svg`");
    }
    // The plot is written as a temporary file renamed over the path: try exactly that.
    tempfile::Builder::new()
        .prefix(".thingsgate-plot-")
        .tempfile_in(dir)
        .with_context(|| format!("--plot `{shown}`: cannot write in `{}`", dir.display()))?;
    if path.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("--plot `{shown}` cannot be replaced"))?;
    }
    Ok(())
}

fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Writes `svg` to `path` whole: into a temporary file beside it, then renamed.
pub(super) fn write(path: &Path, svg: &str) -> anyhow::Result<()> {
    let shown = path.display();
    let mut builder = tempfile::Builder::new();
    builder.prefix(".thingsgate-plot-").suffix(".svg");
    // Readable as any file the user writes (the umask applies), not the owner-only mode of a
    // temporary file.
    #[cfg(unix)]
    builder
        .permissions(<std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o666));
    let mut file = builder
        .tempfile_in(directory_of(path))
        .with_context(|| format!("cannot write the plot `{shown}`"))?;
    file.write_all(svg.as_bytes())
        .and_then(|()| file.as_file().sync_all())
        .with_context(|| format!("cannot write the plot `{shown}`"))?;
    file.persist(path)
        .map_err(|e| anyhow!("cannot write the plot `{shown}`: {}", e.error))?;
    Ok(())
}

/// The title's two lines: what ran, and against what.
fn title(s: &Settings) -> (String, String) {
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let rate = match s.rate {
        Rate::Max => format!("closed loop (inflight {})", s.inflight),
        Rate::PerSecond(r) => format!("{r} msg/s per device"),
        Rate::Idle => "idle connections".to_owned(),
    };
    let first = format!(
        "bench run: {} \u{2192} {}, QoS {}, {rate}",
        plural(s.devices, "device", "devices"),
        plural(s.subscribers, "subscriber", "subscribers"),
        s.qos as u8,
    );
    let mut second = format!(
        "{}, MQTT {}, payload {} B",
        s.url,
        s.protocol_name(),
        s.payload_size
    );
    match &s.twin {
        Some(ns) => second.push_str(&format!(", twin updates in {ns}")),
        None => second.push_str(&format!(", topic {}", s.topic)),
    }
    if let Some(churn) = &s.policy_churn {
        second.push_str(&format!(
            ", a policy change every {} s",
            churn.every.as_secs_f64()
        ));
    }
    (first, second)
}

/// `12000` → `12k`, `1500` → `1.5k`, `0.5` → `0.5`.
fn short(value: f64) -> String {
    let trim = |text: String| {
        if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            text
        }
    };
    let magnitude = value.abs();
    if magnitude >= 1e6 {
        format!("{}M", trim(format!("{:.1}", value / 1e6)))
    } else if magnitude >= 1e3 {
        format!("{}k", trim(format!("{:.1}", value / 1e3)))
    } else if magnitude >= 1.0 || magnitude == 0.0 {
        trim(format!("{value:.1}"))
    } else {
        trim(format!("{value:.3}"))
    }
}

/// Milliseconds as written on the latency axis: `0.05`, `2`, `1000`.
fn milliseconds(ms: f64) -> String {
    let text = format!("{ms:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The smallest 1, 2 or 5 times a power of ten at least `v` (> 0).
fn round_up(v: f64) -> f64 {
    let decade = 10f64.powf(v.log10().floor());
    let m = v / decade;
    decade
        * [1.0, 2.0, 5.0, 10.0]
            .into_iter()
            .find(|r| m <= r + 1e-9)
            .unwrap_or(10.0)
}

/// `v` if it is 1, 2 or 5 times a power of ten: the log axis labels those only (plotters
/// marks every ninth of a decade, too many to read).
fn one_two_five(v: f64) -> Option<f64> {
    if v <= 0.0 {
        return None;
    }
    let mantissa = v / 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .any(|m| (mantissa - m).abs() < 1e-6)
        .then_some(v)
}

/// The lines of one series: runs of consecutive points of one phase that have a value, as
/// (middle of the interval, value). An interval without deliveries breaks a latency line
/// rather than drawing it through zero, and a line never crosses from one phase into the next
/// (the ramp's zero rising into publishing's first interval would draw a slope that never was).
/// A run of one point spans its interval, so that it shows.
fn lines(timeline: &Timeline, value: fn(&Point) -> Option<f64>) -> Vec<Vec<(f64, f64)>> {
    let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current: Vec<&Point> = Vec::new();
    let mut close = |current: &mut Vec<&Point>| {
        let run: Vec<(f64, f64)> = match current.as_slice() {
            [] => return,
            [one] => value(one)
                .map(|v| vec![(one.t - one.seconds, v), (one.t, v)])
                .unwrap_or_default(),
            many => many
                .iter()
                .filter_map(|p| Some((p.middle(), value(p)?)))
                .collect(),
        };
        current.clear();
        runs.push(run);
    };
    for p in &timeline.points {
        let same_phase = current
            .last()
            .is_none_or(|last| timeline.phase_of(last) == timeline.phase_of(p));
        if value(p).is_none() || !same_phase {
            close(&mut current);
        }
        if value(p).is_some() {
            current.push(p);
        }
    }
    close(&mut current);
    runs
}

/// The latency axis: from the power of ten below the lowest p50 (plotters labels a log axis
/// from its first power of ten on) to the first 1, 2 or 5 times a power of ten above four
/// times the highest max, so that the top quarter (the legend's) stays clear of the lines.
fn latency_range(points: &[Point]) -> Range<f64> {
    let values = points
        .iter()
        .filter_map(|p| p.latency)
        .flat_map(|l| [l.p50_ms, l.max_ms]);
    let (low, high) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !low.is_finite() || high <= 0.0 {
        return 0.01..1000.0;
    }
    let low = 10f64.powf((low.max(1e-4) / 1.2).log10().floor());
    let high = round_up(high * 4.0).max(low * 10.0);
    low..high
}

fn drawn<E: std::error::Error + Send + Sync>(
    result: Result<(), DrawingAreaErrorKind<E>>,
) -> anyhow::Result<()> {
    result.map_err(|e| anyhow!("cannot draw the plot: {e}"))
}

/// The SVG of `timeline` for the run `s`.
pub(super) fn render(s: &Settings, timeline: &Timeline) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        drawn(root.fill(&WHITE))?;
        let (first, second) = title(s);
        let (head, body) = root.split_vertically(70);
        drawn(head.draw_text(&first, &(FONT, TITLE).into_font().color(&BLACK), (20, 12)))?;
        drawn(head.draw_text(
            &second,
            &(FONT, SUBTITLE).into_font().color(&RGBColor(90, 90, 90)),
            (20, 44),
        ))?;
        let (upper, lower) = body.split_vertically(body.dim_in_pixel().1 / 2);
        let end = timeline
            .end
            .max(timeline.points.last().map_or(0.0, |p| p.t))
            .max(0.5);
        draw_throughput(&upper, timeline, end)?;
        draw_latency(&lower, timeline, end)?;
        drawn(root.present())?;
    }
    Ok(svg)
}

/// The ramp and the drain shaded, dashed lines where publishing starts and ends, and each
/// phase named above the chart where its name fits (inside, a grid line would cross it).
fn draw_phases<DB: DrawingBackend, Y: Ranged<ValueType = f64>>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    chart: &mut ChartContext<'_, DB, Cartesian2d<RangedCoordf64, Y>>,
    timeline: &Timeline,
    y: Range<f64>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let (start, end) = (timeline.publish_start, timeline.publish_end);
    let shaded = [(0.0, start), (end, timeline.end)];
    chart
        .draw_series(
            shaded
                .into_iter()
                .filter(|(a, b)| b > a)
                .map(|(a, b)| Rectangle::new([(a, y.start), (b, y.end)], SHADE.filled())),
        )
        .map_err(|e| anyhow!("cannot draw the plot: {e}"))?;
    for x in [start, end] {
        chart
            .draw_series(DashedLineSeries::new(
                [(x, y.start), (x, y.end)],
                5,
                4,
                BOUNDARY.stroke_width(1),
            ))
            .map_err(|e| anyhow!("cannot draw the plot: {e}"))?;
    }
    let font = (FONT, LABEL).into_font();
    let grey = RGBColor(100, 100, 100);
    let base = area.get_base_pixel();
    let top = chart.plotting_area().get_pixel_range().1.start;
    let names = [
        ("ramp", 0.0, start, Some(HPos::Right)),
        ("publish", start, end, None),
        ("drain", end, timeline.end, Some(HPos::Left)),
    ];
    for (name, a, b, beside) in names {
        if b <= a {
            continue;
        }
        let (left, right) = (
            chart.backend_coord(&(a, y.start)).0,
            chart.backend_coord(&(b, y.start)).0,
        );
        let needed = font
            .box_size(name)
            .map_or(u32::MAX, |(w, _)| w.saturating_add(6));
        let fits = u32::try_from(right - left).is_ok_and(|w| w >= needed);
        // A phase too narrow for its name (a short ramp, a short drain) is named beside it,
        // towards the chart's edge: the ramp's name ends where the ramp ends, the drain's
        // starts where the drain starts.
        let placed = match (fits, beside) {
            (true, _) => Some(((left + right) / 2, HPos::Center)),
            (false, Some(HPos::Right)) => Some((right, HPos::Right)),
            (false, Some(HPos::Left)) => Some((left, HPos::Left)),
            (false, _) => None,
        };
        if let Some((x, anchor)) = placed {
            let style = font.color(&grey).pos(Pos::new(anchor, VPos::Bottom));
            drawn(area.draw_text(name, &style, (x - base.0, top - base.1 - LABEL_GAP)))?;
        }
    }
    Ok(())
}

/// One series' lines (see [`lines`]), named in the legend once.
fn draw_lines<DB: DrawingBackend, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<RangedCoordf64, Y>>,
    timeline: &Timeline,
    (name, color, width): (&str, RGBColor, u32),
    value: fn(&Point) -> Option<f64>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let mut named = false;
    for line in lines(timeline, value) {
        let drawn = chart
            .draw_series(LineSeries::new(line, color.stroke_width(width)))
            .map_err(|e| anyhow!("cannot draw the plot: {e}"))?;
        if !named {
            named = true;
            drawn.label(name).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 22, y)], color.stroke_width(width))
            });
        }
    }
    Ok(())
}

fn draw_throughput<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    timeline: &Timeline,
    end: f64,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let top = timeline
        .points
        .iter()
        .flat_map(|p| [p.sent_per_second(), p.received_per_second()])
        .fold(0.0f64, f64::max);
    // Headroom: the legend's rows stay above the lines.
    let top = if top > 0.0 { top * 1.4 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .margin_left(20)
        .margin_right(RIGHT_MARGIN)
        .margin_top(24)
        .x_label_area_size(42)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, 0.0..top)
        .map_err(|e| anyhow!("cannot draw the plot: {e}"))?;
    draw_phases(area, &mut chart, timeline, 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the run started")
        .y_desc("messages per second")
        .y_label_formatter(&|v| short(*v))
        .x_label_formatter(&|v| short(*v))
        .axis_desc_style((FONT, AXIS))
        .label_style((FONT, LABEL))
        .light_line_style(GRID_LIGHT)
        .bold_line_style(GRID)
        .draw()
        .map_err(|e| anyhow!("cannot draw the plot: {e}"))?;
    draw_lines(&mut chart, timeline, ("sent/s", SENT, 2), |p| {
        Some(p.sent_per_second())
    })?;
    draw_lines(&mut chart, timeline, ("received/s", RECEIVED, 2), |p| {
        Some(p.received_per_second())
    })?;
    chart
        .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())
        .map_err(|e| anyhow!("cannot draw the plot: {e}"))?
        .label("ramp, drain")
        .legend(|(x, y)| Rectangle::new([(x, y - 6), (x + 22, y + 6)], SHADE.filled()));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(190, 190, 190))
        .label_font((FONT, LABEL))
        .draw()
        .map_err(|e| anyhow!("cannot draw the plot: {e}"))?;
    Ok(())
}

fn draw_latency<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    timeline: &Timeline,
    end: f64,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let range = latency_range(&timeline.points);
    let mut chart = ChartBuilder::on(area)
        .margin_left(20)
        .margin_right(RIGHT_MARGIN)
        .margin_top(24)
        .margin_bottom(6)
        .x_label_area_size(42)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, range.clone().log_scale())
        .map_err(|e| anyhow!("cannot draw the plot: {e}"))?;
    draw_phases(area, &mut chart, timeline, range.clone())?;
    chart
        .configure_mesh()
        .x_desc("seconds since the run started")
        .y_desc("latency, ms (log scale)")
        // Enough key points that each decade's 2 and 5 are among them (labelled), the rest
        // unlabelled grid lines.
        .y_labels(40)
        .y_label_formatter(&|v| one_two_five(*v).map(milliseconds).unwrap_or_default())
        .x_label_formatter(&|v| short(*v))
        .axis_desc_style((FONT, AXIS))
        .label_style((FONT, LABEL))
        // Nine lines a decade are grid enough: no finer ones.
        .light_line_style(TRANSPARENT)
        .bold_line_style(GRID_LOG)
        .draw()
        .map_err(|e| anyhow!("cannot draw the plot: {e}"))?;
    draw_lines(&mut chart, timeline, ("max", MAX, 1), |p| {
        p.latency.map(|l| l.max_ms)
    })?;
    draw_lines(&mut chart, timeline, ("p99", P99, 2), |p| {
        p.latency.map(|l| l.p99_ms)
    })?;
    draw_lines(&mut chart, timeline, ("p50", P50, 2), |p| {
        p.latency.map(|l| l.p50_ms)
    })?;
    if timeline.points.iter().all(|p| p.latency.is_none()) {
        let style = (FONT, AXIS)
            .into_font()
            .color(&RGBColor(120, 120, 120))
            .pos(Pos::new(HPos::Center, VPos::Center));
        chart
            .draw_series(std::iter::once(Text::new(
                "no deliveries",
                (end / 2.0, (range.start * range.end).sqrt()),
                style,
            )))
            .map_err(|e| anyhow!("cannot draw the plot: {e}"))?;
    } else {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(190, 190, 190))
            .label_font((FONT, LABEL))
            .draw()
            .map_err(|e| anyhow!("cannot draw the plot: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::super::timeline::Percentiles;
    use super::*;

    fn point(t: f64, sent: u64, latency: Option<(f64, f64, f64)>) -> Point {
        Point {
            t,
            seconds: 0.25,
            sent,
            received: sent,
            latency: latency.map(|(p50_ms, p99_ms, max_ms)| Percentiles {
                p50_ms,
                p99_ms,
                max_ms,
                samples: sent,
            }),
        }
    }

    #[test]
    fn the_log_axis_labels_one_two_and_five_of_each_decade() {
        let labelled: Vec<f64> = [0.1, 0.2, 0.3, 0.5, 1.0, 4.0, 20.0, 50.0, 70.0, 100.0]
            .into_iter()
            .filter_map(one_two_five)
            .collect();
        assert_eq!(labelled, [0.1, 0.2, 0.5, 1.0, 20.0, 50.0, 100.0]);
    }

    #[test]
    fn numbers_on_axes_are_short() {
        assert_eq!(short(0.0), "0");
        assert_eq!(short(12_000.0), "12k");
        assert_eq!(short(1_500.0), "1.5k");
        assert_eq!(short(2_500_000.0), "2.5M");
        assert_eq!(short(0.05), "0.05");
        assert_eq!(short(7.5), "7.5");
        assert_eq!(milliseconds(1000.0), "1000");
        assert_eq!(milliseconds(0.05), "0.05");
    }

    #[test]
    fn lines_break_where_nothing_was_received_and_between_phases() {
        let timeline = Timeline {
            step: 0.25,
            points: vec![
                point(0.25, 0, None),
                point(0.5, 10, Some((1.0, 2.0, 3.0))),
                point(0.75, 10, Some((1.0, 2.0, 3.0))),
                point(1.0, 0, None),
                point(1.25, 10, Some((1.0, 2.0, 30.0))),
                point(1.5, 10, Some((1.0, 2.0, 40.0))),
                point(1.75, 10, Some((1.0, 2.0, 50.0))),
            ],
            publish_start: 0.25,
            publish_end: 1.5,
            end: 1.75,
        };
        let max = lines(&timeline, |p| p.latency.map(|l| l.max_ms));
        assert_eq!(
            max,
            [
                vec![(0.375, 3.0), (0.625, 3.0)],
                vec![(1.125, 30.0), (1.375, 40.0)],
                // The drain's one point spans its interval.
                vec![(1.5, 50.0), (1.75, 50.0)],
            ]
        );
        let sent = lines(&timeline, |p| Some(p.sent_per_second()));
        assert_eq!(sent.len(), 3, "ramp, publish, drain: {sent:?}");
        assert_eq!(sent[0], [(0.0, 0.0), (0.25, 0.0)]);
    }

    #[test]
    fn the_latency_axis_runs_from_a_power_of_ten_below_p50_to_a_round_value_above_four_times_max() {
        let points = [
            point(0.5, 1, Some((0.3, 2.0, 45.0))),
            point(0.75, 1, Some((0.15, 0.5, 0.9))),
        ];
        let r = latency_range(&points);
        // 0.15 / 1.2 = 0.125 → 0.1; 45 × 4 = 180 → 200.
        assert!(
            (r.start - 0.1).abs() < 1e-12 && (r.end - 200.0).abs() < 1e-9,
            "{r:?}"
        );
        assert!((round_up(1360.0) - 2000.0).abs() < 1e-9);
        assert!((round_up(6.0) - 10.0).abs() < 1e-9);
        assert_eq!(latency_range(&[point(1.0, 0, None)]), 0.01..1000.0);
    }

    /// The contents of the SVG's `<text>` elements.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| t.split_once('>'))
            .filter_map(|(_, rest)| rest.split_once("</text>"))
            .map(|(text, _)| text.trim().to_owned())
            .collect()
    }

    /// Settings as `bench run ARGS` makes them.
    fn settings(args: &[&str]) -> Settings {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: crate::bench::run::RunArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(
            ["run", "--url", "mqtt://127.0.0.1:1"].iter().chain(args),
        )
        .unwrap();
        Settings::from_args(cli.args).unwrap()
    }

    #[test]
    fn the_svg_has_both_panels_their_series_and_axes_the_phases_and_the_scenario() {
        let s = settings(&["--devices", "5", "--qos", "1", "--rate", "20"]);
        let timeline = Timeline {
            step: 0.25,
            points: vec![
                point(0.1, 0, None),
                point(0.35, 25, Some((0.4, 1.2, 3.0))),
                point(0.6, 25, Some((0.5, 1.5, 9.0))),
                point(0.7, 0, Some((0.5, 0.6, 0.7))),
            ],
            publish_start: 0.1,
            publish_end: 0.6,
            end: 0.7,
        };
        let svg = render(&s, &timeline).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        let texts = texts(&svg);
        for text in [
            "5 devices \u{2192} 1 subscriber, QoS 1, 20 msg/s per device",
            "mqtt://127.0.0.1:1, MQTT 5",
            "messages per second",
            "latency, ms (log scale)",
            "seconds since the run started",
            "sent/s",
            "received/s",
            "p50",
            "p99",
            "max",
            "ramp",
            "publish",
            "drain",
        ] {
            assert!(
                texts.iter().any(|t| t.contains(text)),
                "`{text}` not in the SVG's texts: {texts:?}"
            );
        }
        assert!(
            svg.matches("<polyline").count() >= 5,
            "two rate lines, three latency lines"
        );
    }

    #[test]
    fn a_run_without_deliveries_says_so_instead_of_an_empty_latency_panel() {
        let s = settings(&["--subscribers", "0"]);
        let timeline = Timeline {
            step: 0.25,
            points: vec![point(0.25, 10, None)],
            publish_start: 0.0,
            publish_end: 0.25,
            end: 0.25,
        };
        let svg = render(&s, &timeline).unwrap();
        let texts = texts(&svg);
        assert!(texts.iter().any(|t| t == "no deliveries"), "{texts:?}");
        assert!(!texts.iter().any(|t| t == "p50"), "{texts:?}");
        render(&s, &Timeline::default()).unwrap();
    }

    #[test]
    fn a_path_in_a_missing_directory_or_a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope").join("run.svg");
        let e = check_path(&missing).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        assert!(check_path(dir.path()).is_err());
        let fine = dir.path().join("run.svg");
        check_path(&fine).unwrap();
        assert!(!fine.exists(), "checking leaves no file behind");
        write(&fine, "<svg/>").unwrap();
        assert_eq!(std::fs::read_to_string(&fine).unwrap(), "<svg/>");
        #[cfg(unix)]
        {
            // The mode of any file the user writes (0666 less the umask), not 0600.
            use std::os::unix::fs::PermissionsExt;
            let plain = dir.path().join("plain");
            std::fs::write(&plain, "x").unwrap();
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&fine), mode(&plain));
            std::fs::remove_file(&plain).unwrap();
        }
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file is left: {left:?}");
    }
}
