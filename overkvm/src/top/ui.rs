//! Drawing the interactive view with ratatui: a header (devices, mode, counts, kernel health),
//! the table, a status line, and the help screen. Reads the `App`, never changes it.

use overkvm_common::Health;
use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Cell, Clear, HighlightSpacing, Paragraph, Row, Table, TableState},
};

use super::{
    app::{App, KEYS},
    batch::{fit, sanitize},
    columns::{Column, fit_columns, fmt_mbs, fmt_rate},
    rows::{RowKind, budget_text, mb_per_second, per_second},
};
use crate::report::{DeviceRow, Report};

/// Device lines the header shows at most (the busiest; the rest are counted).
const MAX_DEVICE_LINES: usize = 8;

/// Draws the whole screen; returns how many table rows fit (the page for PgUp/PgDn).
pub fn draw(frame: &mut Frame, app: &App, table: &mut TableState) -> usize {
    let area = frame.area();
    let header = header_lines(app, area);
    let [top, body, status] = Layout::vertical([
        Constraint::Length(header.len() as u16),
        Constraint::Fill(1),
        Constraint::Length(1),
    ])
    .areas(area);
    frame.render_widget(Paragraph::new(header), top);
    draw_table(frame, app, body, table);
    frame.render_widget(Paragraph::new(status_line(app, area.width)), status);
    if app.help_open() {
        draw_help(frame, area);
    }
    usize::from(body.height.saturating_sub(1))
}

/// `19:02:11` out of an RFC 3339 timestamp (UTC).
fn clock(timestamp: &str) -> &str {
    let time = timestamp.split_once('T').map_or(timestamp, |(_, t)| t);
    time.split(['.', 'Z']).next().unwrap_or(time)
}

/// `1s`, `0.5s`.
fn fmt_interval(d: std::time::Duration) -> String {
    let s = d.as_secs_f64();
    if (s - s.round()).abs() < 1e-6 {
        format!("{s:.0}s")
    } else {
        format!("{s:.2}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
            + "s"
    }
}

fn header_lines(app: &App, area: Rect) -> Vec<Line<'static>> {
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let Some(report) = app.report() else {
        return vec![Line::from(vec![
            Span::styled("overkvm-io top", bold),
            Span::raw(format!(
                "  waiting for the first interval ({})…",
                fmt_interval(app.interval())
            )),
        ])];
    };
    let mut lines = vec![Line::from(vec![
        Span::styled("overkvm-io top", bold),
        // Least useful last: a narrow terminal cuts the hook mode first.
        Span::raw(format!(
            "  {}  VMs {}  processes {}  every {}  hooks {}",
            clock(&sanitize(&report.timestamp)),
            report.vm_count(),
            report.process_count(),
            fmt_interval(app.interval()),
            sanitize(&report.mode),
        )),
    ])];
    let mut devices: Vec<&DeviceRow> = report.devices.iter().collect();
    devices.sort_by(|a, b| {
        b.counts
            .total_ops()
            .cmp(&a.counts.total_ops())
            .then_with(|| a.device.cmp(&b.device))
    });
    // Leave the table at least ten lines on small terminals.
    let room = usize::from(area.height.saturating_sub(14)).clamp(1, MAX_DEVICE_LINES);
    let shown = if devices.len() > room {
        room - 1
    } else {
        devices.len()
    };
    for d in &devices[..shown] {
        lines.push(device_line(d, report, app));
    }
    if devices.len() > shown {
        lines.push(Line::styled(
            format!("… {} more devices", devices.len() - shown),
            Style::new().fg(Color::DarkGray),
        ));
    }
    if devices.is_empty() {
        lines.push(Line::styled(
            "no block I/O in this interval",
            Style::new().fg(Color::DarkGray),
        ));
    }
    if let Some(health) = health_line(report) {
        lines.push(health);
    }
    lines
}

fn device_line(d: &DeviceRow, report: &Report, app: &App) -> Line<'static> {
    let secs = report.interval_s;
    let c = &d.counts;
    Line::from(vec![
        Span::styled(
            format!("{:<10}", fit(&sanitize(&d.device), 10)),
            Style::new().add_modifier(Modifier::BOLD),
        ),
        Span::raw(format!(
            " R {:>7}/s {:>6} MB/s   W {:>7}/s {:>6} MB/s   ",
            fmt_rate(per_second(c.read_ops, secs)),
            fmt_mbs(mb_per_second(c.read_bytes, secs)),
            fmt_rate(per_second(c.write_ops, secs)),
            fmt_mbs(mb_per_second(c.write_bytes, secs)),
        )),
        Span::styled(
            sanitize(&budget_text(&d.device, app.throttle())),
            Style::new().fg(Color::DarkGray),
        ),
    ])
}

/// What the kernel side reported for the interval (losses stand out); None when nothing.
fn health_line(report: &Report) -> Option<Line<'static>> {
    let h = &report.health;
    if h.events.is_empty() && h.read_errors == 0 {
        return None;
    }
    let mut parts: Vec<String> = h.events.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if h.read_errors > 0 {
        parts.push(format!("read_errors={}", h.read_errors));
    }
    let lost = h.read_errors > 0
        || Health::ALL
            .iter()
            .any(|e| e.is_loss() && h.events.contains_key(e.name()));
    let style = if lost {
        Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)
    } else {
        Style::new().fg(Color::DarkGray)
    };
    Some(Line::styled(
        format!("kernel: {}", sanitize(&parts.join("  "))),
        style,
    ))
}

fn draw_table(frame: &mut Frame, app: &App, area: Rect, state: &mut TableState) {
    let columns = fit_columns(area.width);
    let sort = app.sort();
    let header = Row::new(columns.iter().map(|&(c, w)| {
        if c != sort.column {
            return aligned(c, c.header().to_string());
        }
        // The arrow where it fits; the status line always names the sort.
        let mut title = c.header().to_string();
        if title.chars().count() < usize::from(w) {
            title.push(sort_arrow(sort.descending()));
        }
        aligned(c, title).style(
            Style::new()
                .fg(Color::Yellow)
                .add_modifier(Modifier::UNDERLINED),
        )
    }))
    .style(
        Style::new()
            .add_modifier(Modifier::BOLD)
            .bg(Color::DarkGray)
            .fg(Color::White),
    );
    let rows = app.rows().iter().map(|r| {
        let style = match r.kind {
            RowKind::Device { .. } => Style::new().fg(Color::Gray),
            RowKind::Merged { .. } if r.vm => Style::new().fg(Color::Cyan),
            RowKind::Merged { .. } if r.exited => Style::new().fg(Color::DarkGray),
            RowKind::Merged { .. } => Style::new(),
        };
        Row::new(columns.iter().map(|&(c, w)| aligned(c, c.text(r, w)))).style(style)
    });
    let table = Table::new(rows, columns.iter().map(|&(_, w)| Constraint::Length(w)))
        .header(header)
        .column_spacing(1)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_spacing(HighlightSpacing::Never);
    state.select(app.selected());
    frame.render_stateful_widget(table, area, state);
    if app.rows().is_empty() && area.height > 2 {
        let why = if app.report().is_none() {
            "waiting for the first sample…".to_string()
        } else if !app.filter().is_empty() {
            format!("no process matches \"{}\"", sanitize(app.filter()))
        } else if app.vms_only() && app.process_total() > 0 {
            "no VM did I/O in this interval (v shows all processes)".into()
        } else {
            "no process did I/O in this interval".into()
        };
        let line = Rect {
            y: area.y + 2,
            height: 1,
            ..area
        };
        frame.render_widget(
            Paragraph::new(why)
                .style(Style::new().fg(Color::DarkGray))
                .centered(),
            line,
        );
    }
}

fn sort_arrow(descending: bool) -> char {
    if descending { '▼' } else { '▲' }
}

fn aligned(c: Column, text: String) -> Cell<'static> {
    let line = Line::from(text);
    Cell::from(if c.right_aligned() {
        line.right_aligned()
    } else {
        line
    })
}

/// The bottom line: the filter prompt while typing, else the view's state and the main keys.
fn status_line(app: &App, width: u16) -> Line<'static> {
    if let Some(input) = app.filter_input() {
        return Line::from(vec![
            Span::styled("filter: ", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(sanitize(input)),
            Span::styled("█", Style::new().add_modifier(Modifier::SLOW_BLINK)),
            Span::styled(
                "   Enter applies · Esc clears",
                Style::new().fg(Color::DarkGray),
            ),
        ]);
    }
    let mut spans = Vec::new();
    if app.paused() {
        spans.push(Span::styled(
            " PAUSED ",
            Style::new()
                .fg(Color::Black)
                .bg(Color::Yellow)
                .add_modifier(Modifier::BOLD),
        ));
        spans.push(Span::raw(" "));
    }
    let sort = app.sort();
    let mut state = format!(
        "sort {}{}  {}",
        sort.column.header(),
        sort_arrow(sort.descending()),
        if app.vms_only() {
            "VMs only"
        } else {
            "all processes"
        },
    );
    if !app.filter().is_empty() {
        state.push_str(&format!("  filter \"{}\"", sanitize(app.filter())));
    }
    let keys = "h help  q quit";
    let used: usize = spans.iter().map(|s| s.width()).sum();
    let room = usize::from(width).saturating_sub(used + keys.len() + 1);
    let state = fit(&state, room);
    let pad = room.saturating_sub(state.chars().count()) + 1;
    spans.push(Span::raw(state));
    spans.push(Span::raw(" ".repeat(pad)));
    spans.push(Span::styled(keys, Style::new().fg(Color::DarkGray)));
    Line::from(spans)
}

fn draw_help(frame: &mut Frame, area: Rect) {
    let key_style = Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD);
    let col_style = Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD);
    let mut lines: Vec<Line> = KEYS
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!("{k:<28}"), key_style),
                Span::raw(*what),
            ])
        })
        .collect();
    lines.push(Line::raw(""));
    lines.extend(Column::ALL.iter().map(|c| {
        Line::from(vec![
            Span::styled(format!("{:<10}", c.header()), col_style),
            Span::raw(c.meaning()),
        ])
    }));
    let width = area.width.saturating_sub(2).min(84);
    let height = area.height.min(lines.len() as u16 + 2);
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" help · any key closes ")),
        popup,
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
    use ratatui::{Terminal, backend::TestBackend, buffer::Buffer};

    use super::*;
    use crate::{
        tick::{ActiveLimit, BudgetUse, ThrottleView},
        top::testdata::sample_report,
    };

    /// The screen as text, one string per line.
    fn screen(buffer: &Buffer) -> Vec<String> {
        let width = usize::from(buffer.area.width);
        buffer
            .content()
            .chunks(width)
            .map(|cells| cells.iter().map(|c| c.symbol()).collect())
            .collect()
    }

    fn render(app: &App, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("test backend");
        let mut state = TableState::default();
        terminal
            .draw(|f| {
                draw(f, app, &mut state);
            })
            .expect("drawing");
        screen(terminal.backend().buffer())
    }

    fn keys(app: &mut App, keys: &str) {
        for c in keys.chars() {
            let code = match c {
                '\n' => KeyCode::Enter,
                c => KeyCode::Char(c),
            };
            app.handle_key(KeyEvent::new(code, KeyModifiers::NONE));
        }
    }

    /// Index of the first line containing `needle`.
    fn line_of(screen: &[String], needle: &str) -> usize {
        screen
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} not on screen:\n{}", screen.join("\n")))
    }

    fn sample_app() -> App {
        let mut app = App::new(Duration::from_secs(1), false);
        app.set_report(sample_report());
        app
    }

    #[test]
    fn header_and_rows_vms_first() {
        let s = render(&sample_app(), 100, 24);
        assert!(
            s[0].contains(
                "overkvm-io top  19:02:11  VMs 2  processes 4  every 1s  hooks io-start-done"
            ),
            "{}",
            s[0]
        );
        // vda: 1200+300+50 reads, 800+2500+9000 writes.
        let vda = &s[line_of(&s, "vda   ")];
        assert!(vda.contains("R    1550/s"), "{vda}");
        assert!(vda.contains("W   12300/s"), "{vda}");
        assert!(vda.contains("50.4 MB/s"), "{vda}");
        assert!(vda.contains("no budget"), "{vda}");
        let head = line_of(&s, "VM/COMM▲");
        for h in [
            "PID", "DEVICE", "R/s", "W/s", "RMB/s", "WMB/s", "AVGµs", "P99µs", "%IOPS", "THROTTLE",
        ] {
            assert!(s[head].contains(h), "{h} missing: {}", s[head]);
        }
        let (db, web, fio) = (
            line_of(&s, "vm:db02"),
            line_of(&s, "vm:web01"),
            line_of(&s, "fio"),
        );
        assert!(head < db && db < web && web < fio, "{}", s.join("\n"));
        assert!(s[web].contains("▸2 devs"), "{}", s[web]);
        // fio: 9050 of vda's 13850 ops.
        assert!(s[fio].contains(" 65.3 "), "{}", s[fio]);
        assert!(s[line_of(&s, "sort VM/COMM▲")].contains("h help  q quit"));
    }

    #[test]
    fn sorting_by_a_column_and_reversed() {
        let mut app = sample_app();
        keys(&mut app, ">>>>");
        let s = render(&app, 100, 24);
        assert!(s[line_of(&s, "VM/COMM")].contains("W/s▼"));
        assert!(line_of(&s, "vm:db02") < line_of(&s, "vm:web01"));
        assert!(line_of(&s, "fio") < line_of(&s, "ev\\x1b"));
        keys(&mut app, "r");
        let s = render(&app, 100, 24);
        assert!(s[line_of(&s, "VM/COMM")].contains("W/s▲"));
        assert!(line_of(&s, "vm:web01") < line_of(&s, "vm:db02"));
        assert!(line_of(&s, "ev\\x1b") < line_of(&s, "fio"));
        assert!(
            line_of(&s, "vm:db02") < line_of(&s, "ev\\x1b"),
            "VMs stay first"
        );
    }

    #[test]
    fn vms_only_toggle_and_filter() {
        let mut app = sample_app();
        keys(&mut app, "v");
        let s = render(&app, 100, 24).join("\n");
        assert!(s.contains("vm:web01") && s.contains("vm:db02") && s.contains("VMs only"));
        assert!(!s.contains("fio"), "{s}");
        keys(&mut app, "v/fi");
        let s = render(&app, 100, 24).join("\n");
        assert!(s.contains("filter: fi█"), "{s}");
        assert!(s.contains("vm:web01"), "not applied before Enter");
        keys(&mut app, "\n");
        let s = render(&app, 100, 24).join("\n");
        assert!(s.contains("fio") && !s.contains("vm:web01"), "{s}");
        assert!(s.contains("filter \"fi\""), "{s}");
        // The prompt starts from the applied filter.
        keys(&mut app, "/zz\n");
        let s = render(&app, 100, 24).join("\n");
        assert!(s.contains("no process matches \"fizz\""), "{s}");
    }

    #[test]
    fn expand_per_device() {
        let mut app = sample_app();
        keys(&mut app, "je");
        let s = render(&app, 100, 24);
        let web = line_of(&s, "vm:web01");
        assert!(s[web].contains("▾2 devs"), "{}", s[web]);
        assert!(
            s[web + 1].contains("├─") && s[web + 1].contains("vda"),
            "{}",
            s[web + 1]
        );
        assert!(
            s[web + 2].contains("└─") && s[web + 2].contains("vdb"),
            "{}",
            s[web + 2]
        );
        // web01's 100 reads are all of vdb's ops but 5 (the hostile process).
        assert!(s[web + 2].contains(" 95.2 "), "{}", s[web + 2]);
    }

    #[test]
    fn hostile_name_renders_escaped() {
        let s = render(&sample_app(), 100, 24).join("\n");
        assert!(!s.contains('\x1b'), "raw ESC on screen:\n{s}");
        assert!(!s.chars().any(|c| c.is_control() && c != '\n'));
        assert!(s.contains("ev\\x1b[2J\\x0ail"), "{s}");
    }

    #[test]
    fn fits_80x24_and_160x40() {
        let s = render(&sample_app(), 80, 24);
        let head = &s[line_of(&s, "VM/COMM")];
        assert!(
            head.contains("%IOPS") && !head.contains("THROTTLE"),
            "{head}"
        );
        assert!(s[line_of(&s, "sort ")].ends_with("h help  q quit"));
        let s = render(&sample_app(), 160, 40);
        assert!(s[line_of(&s, "VM/COMM")].contains("THROTTLE"));
        // Tiny terminals must not panic.
        for (w, h) in [(1, 1), (20, 5), (40, 10)] {
            render(&sample_app(), w, h);
        }
    }

    #[test]
    fn budgets_limits_and_health_show() {
        let mut app = sample_app();
        app.set_throttle(Some(ThrottleView {
            budgets: vec![BudgetUse {
                device: "vda".into(),
                iops_budget: Some(20000),
                iops_used: 13850.0,
                engaged: false,
                ..BudgetUse::default()
            }],
            limits: vec![ActiveLimit {
                vm: "db02".into(),
                cgroup: String::new(),
                device: "vda".into(),
                riops: Some(500),
                wiops: Some(1000),
                rbps: None,
                wbps: None,
                since_s: 1.0,
            }],
            ..ThrottleView::default()
        }));
        let mut r = sample_report();
        r.health.events.insert("inflight_miss", 3);
        app.set_report(r);
        let s = render(&app, 160, 40);
        assert!(s[line_of(&s, "vda   ")].contains("budget 20000 IOPS 69% used"));
        assert!(s[line_of(&s, "vdb   ")].contains("no budget"));
        assert!(s[line_of(&s, "vm:db02")].contains("r500 w1000"));
        assert!(s[line_of(&s, "kernel:")].contains("inflight_miss=3"));
    }

    #[test]
    fn help_lists_every_key_and_column() {
        let mut app = sample_app();
        keys(&mut app, "?");
        let s = render(&app, 100, 30).join("\n");
        assert!(s.contains("help · any key closes"), "{s}");
        for (k, _) in KEYS {
            assert!(s.contains(k), "{k} missing:\n{s}");
        }
        for c in Column::ALL {
            assert!(s.contains(c.meaning()), "{c:?} missing:\n{s}");
        }
    }

    #[test]
    fn before_the_first_report_and_paused() {
        let mut app = App::new(Duration::from_millis(500), false);
        let s = render(&app, 80, 24).join("\n");
        assert!(s.contains("waiting for the first interval (0.5s)"), "{s}");
        keys(&mut app, "p");
        let s = render(&app, 80, 24).join("\n");
        assert!(s.contains(" PAUSED "), "{s}");
    }

    #[test]
    fn clock_and_interval_text() {
        assert_eq!(clock("2026-11-26T19:02:11.512Z"), "19:02:11");
        assert_eq!(clock("2026-11-26T19:02:11Z"), "19:02:11");
        assert_eq!(fmt_interval(Duration::from_secs(2)), "2s");
        assert_eq!(fmt_interval(Duration::from_millis(250)), "0.25s");
        assert_eq!(fmt_interval(Duration::from_millis(100)), "0.1s");
    }
}
