// Plots of the ledger the page embeds (<script id="ledger">): the same JSON
// `understudy report savings --json` prints. uPlot draws; nothing is fetched.
(function () {
  "use strict";
  var source = document.getElementById("ledger");
  if (!source || typeof uPlot === "undefined") return;
  var ledger = JSON.parse(source.textContent);
  var days = ledger.days || [];
  if (days.length === 0) return;

  var seconds = function (day) { return Date.parse(day + "T00:00:00Z") / 1000; };
  var dayList = Array.from(new Set(days.map(function (row) { return row.day; }))).sort();
  var xs = dayList.map(seconds);
  var tasks = Array.from(new Set(days.map(function (row) { return row.task; }))).sort();
  var rowOf = function (task, day) {
    return days.find(function (row) { return row.task === task && row.day === day; });
  };
  // Money adds up across tasks; shares do not, so they are drawn per task.
  var summed = function (field) {
    return dayList.map(function (day) {
      return days.filter(function (row) { return row.day === day; })
        .reduce(function (total, row) { return total + row[field]; }, 0);
    });
  };
  var width = function (element) { return Math.max(360, Math.min(640, element.parentElement.clientWidth / 2 - 24)); };
  var palette = ["#0969da", "#1a7f37", "#b42318", "#8250df", "#bf8700", "#57606a"];

  var money = document.getElementById("money-chart");
  if (money) {
    new uPlot({
      title: money.dataset.title, width: width(money), height: 260,
      series: [{}, { label: "paid to the lead", stroke: palette[2] },
               { label: "lead cost avoided", stroke: palette[0] },
               { label: "net savings", stroke: palette[1], width: 2 }],
      axes: [{}, { size: 80, values: function (u, ticks) { return ticks.map(function (v) { return "$" + v.toPrecision(3); }); } }],
    }, [xs, summed("lead_cost"), summed("lead_cost_avoided"), summed("net_savings")], money);
  }

  var quality = document.getElementById("quality-chart");
  if (quality) {
    var series = [{}];
    var data = [xs];
    var share = function (task, field, part) {
      return dayList.map(function (day) {
        var row = rowOf(task, day);
        var value = row && row[field];
        if (!value) return null;
        return part === undefined ? value.value : value.interval[part];
      });
    };
    tasks.forEach(function (task, idx) {
      var color = palette[idx % palette.length];
      series.push({ label: task + " served share", stroke: color, width: 2 });
      data.push(share(task, "served_share"));
      if (tasks.length === 1) {
        series.push({ label: "audited agreement", stroke: palette[1], width: 2 });
        data.push(share(task, "served_agreement"));
        series.push({ label: "lower 95 %", stroke: palette[1], dash: [4, 4] });
        data.push(share(task, "served_agreement", 0));
        series.push({ label: "upper 95 %", stroke: palette[1], dash: [4, 4] });
        data.push(share(task, "served_agreement", 1));
      }
    });
    new uPlot({
      title: quality.dataset.title, width: width(quality), height: 260, series: series,
      scales: { y: { range: [0, 1] } },
      axes: [{}, { values: function (u, ticks) { return ticks.map(function (v) { return Math.round(v * 100) + " %"; }); } }],
    }, data, quality);
  }
})();

// Each model version's coverage–agreement curve on test (<div class="curve"
// data-curve="[…]">), from the eval's calibration file: served agreement
// against coverage, one point per threshold, with the certified one marked.
(function () {
  "use strict";
  if (typeof uPlot === "undefined") return;
  document.querySelectorAll("div.curve[data-curve]").forEach(function (element) {
    var points = JSON.parse(element.dataset.curve).slice().sort(function (a, b) { return a.coverage - b.coverage; });
    if (points.length === 0) return;
    var chosen = element.dataset.threshold === "" ? null : Number(element.dataset.threshold);
    var coverage = points.map(function (p) { return p.coverage; });
    var agreement = points.map(function (p) { return p.served_agreement; });
    var marked = points.map(function (p) { return chosen !== null && p.threshold === chosen ? p.served_agreement : null; });
    var percent = function (u, ticks) { return ticks.map(function (v) { return Math.round(v * 100) + " %"; }); };
    new uPlot({
      title: element.dataset.title, width: 420, height: 240,
      scales: { x: { time: false, range: [0, 1] }, y: { range: [Math.min.apply(null, agreement.concat([element.dataset.target * 1])) - 0.02, 1] } },
      axes: [{ label: "coverage", values: percent }, { label: "served agreement", values: percent }],
      series: [{}, { label: "served agreement", stroke: "#337ab7" },
               { label: "certified", stroke: "#d9534f", points: { size: 9, fill: "#d9534f" }, paths: function () { return null; } }],
    }, [coverage, agreement, marked], element);
  });
})();
