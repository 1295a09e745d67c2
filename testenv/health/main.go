// Command health judges Kubernetes objects (SecretRotations read from the API
// server) the way two GitOps tools do, for the Rust integration tests.
//
//	health [--open-libs] --lua SCRIPT.lua FILE.json...
//
// kstatus: sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute, on which Flux's
// health checks (kustomize-controller, helm-controller) rely.
//
// Argo CD: a resource-customization health.lua run in a Lua state set up as
// Argo CD's util/lua does (argoproj/argo-cd, util/lua/lua.go and
// oslib_safe.go, v3), without depending on Argo CD itself.
//
// Each FILE holds one object as JSON. One JSON line is printed per file:
//
//	{"file":"...","kstatus":{"status":"Current","message":"..."},"argo":{"status":"Healthy","message":"..."}}
//
// Argo CD runs health scripts from argocd-cm (resource.customizations) in a
// sandbox: only the base, package and table libraries, plus a "safe" os module
// with time and date that only `require("os")` reaches (the global os is nil).
// There is no string, math or coroutine library (and so no ("x"):find(...))
// unless the customization sets useOpenLibs: true, which --open-libs mirrors;
// Argo's built-in scripts always get the open libraries.
//
// The exit status is 0 when every file was read and its script ran; 1 when a
// file could not be read or a script failed (that file's argo status is then
// Unknown with the error as message, as Argo CD reports it); 2 on usage errors.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	luajson "layeh.com/gopher-json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

// Argo CD's health codes (gitops-engine pkg/health).
const (
	argoUnknown     = "Unknown"
	argoProgressing = "Progressing"
	argoHealthy     = "Healthy"
	argoSuspended   = "Suspended"
	argoDegraded    = "Degraded"
	argoMissing     = "Missing"

	incorrectReturnType = "expect %s output from Lua script, not %s"
	invalidHealthStatus = "Lua returned an invalid health status"
	// Argo CD gives every script run this long (util/lua/lua.go).
	scriptTimeout = 1 * time.Second
	// A finalizer that lets Argo CD run a hook's health check while it is deleted.
	hookFinalizer = "argocd.argoproj.io/hook-finalizer"
)

// healthStatus has the JSON shape of gitops-engine's health.HealthStatus, into
// which Argo CD unmarshals the table the script returns.
type healthStatus struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

type kstatusResult struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

type line struct {
	File    string         `json:"file"`
	Error   string         `json:"error,omitempty"`
	KStatus *kstatusResult `json:"kstatus,omitempty"`
	Argo    *healthStatus  `json:"argo,omitempty"`
}

func main() {
	luaPath := flag.String("lua", "", "Argo CD health script (health.lua) to run against each object")
	openLibs := flag.Bool("open-libs", false, "open every Lua standard library, as Argo CD does for built-in scripts and for customizations with useOpenLibs: true")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: %s [--open-libs] --lua SCRIPT.lua FILE.json...\n", os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()
	if *luaPath == "" || flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	script, err := os.ReadFile(*luaPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}

	out := json.NewEncoder(os.Stdout)
	out.SetEscapeHTML(false)
	failed := false
	for _, file := range flag.Args() {
		l := evaluate(file, string(script), *openLibs)
		if l.Error != "" {
			failed = true
		}
		if err := out.Encode(l); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	if failed {
		os.Exit(1)
	}
}

func evaluate(file, script string, openLibs bool) line {
	res := line{File: file}
	data, err := os.ReadFile(file)
	if err != nil {
		res.Error = err.Error()
		return res
	}
	// The API machinery's decoder, as client-go's dynamic client and Argo CD's
	// cluster cache use: integers become int64, which kstatus requires of
	// metadata.generation and status.observedGeneration.
	obj := &unstructured.Unstructured{}
	if err := obj.UnmarshalJSON(data); err != nil {
		res.Error = fmt.Sprintf("decoding %s: %v", file, err)
		return res
	}

	// Flux: kstatus' generic status reader reports a Compute error as Unknown.
	if r, err := status.Compute(obj); err != nil {
		res.KStatus = &kstatusResult{Status: string(status.UnknownStatus), Message: err.Error()}
	} else {
		res.KStatus = &kstatusResult{Status: string(r.Status), Message: r.Message}
	}

	// Argo CD: gitops-engine's health.GetResourceHealth.
	if obj.GetDeletionTimestamp() != nil && !hasFinalizer(obj, hookFinalizer) {
		res.Argo = &healthStatus{Status: argoProgressing, Message: "Pending deletion"}
		return res
	}
	h, err := executeHealthLua(obj, script, openLibs)
	if err != nil {
		res.Argo = &healthStatus{Status: argoUnknown, Message: err.Error()}
		res.Error = "health script: " + err.Error()
		return res
	}
	res.Argo = h
	return res
}

func hasFinalizer(obj *unstructured.Unstructured, name string) bool {
	for _, f := range obj.GetFinalizers() {
		if f == name {
			return true
		}
	}
	return false
}

// runLua mirrors Argo CD's VM.runLua: a state without the standard libraries
// unless openLibs, then package, base, table and the safe os opened on top.
func runLua(obj *unstructured.Unstructured, script string, openLibs bool) (*lua.LState, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: !openLibs})
	for _, pair := range []struct {
		n string
		f lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
		{lua.OsLibName, openSafeOs},
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(pair.f), NRet: 0, Protect: true}, lua.LString(pair.n)); err != nil {
			panic(err)
		}
	}
	l.PreloadModule(lua.OsLibName, safeOsLoader)

	ctx, cancel := context.WithTimeout(context.Background(), scriptTimeout)
	defer cancel()
	l.SetContext(ctx)

	// Health scripts get an empty actionParams table (it is filled only for actions).
	l.SetGlobal("actionParams", l.CreateTable(0, 0))
	l.SetGlobal("obj", decodeValue(l, obj.Object))

	fn, err := l.LoadString(script)
	if err == nil {
		l.Push(fn)
		err = l.PCall(0, lua.MultRet, nil)
	}
	// Argo CD drops the Lua stack trace from run-time errors.
	var apiErr *lua.ApiError
	if errors.As(err, &apiErr) && apiErr.Type == lua.ApiErrorRun {
		apiErr.StackTrace = ""
		err = apiErr
	}
	return l, err
}

// executeHealthLua mirrors Argo CD's VM.ExecuteHealthLua.
func executeHealthLua(obj *unstructured.Unstructured, script string, openLibs bool) (*healthStatus, error) {
	l, err := runLua(obj, script, openLibs)
	defer l.Close()
	if err != nil {
		return nil, err
	}
	ret := l.Get(-1)
	switch ret.Type() {
	case lua.LTTable:
		data, err := luajson.Encode(ret)
		if err != nil {
			return nil, err
		}
		h := &healthStatus{}
		if err := json.Unmarshal(data, h); err != nil {
			// An empty table encodes as [] (and any other type mismatch is
			// treated alike by Argo CD): an empty status.
			var typeErr *json.UnmarshalTypeError
			if errors.As(err, &typeErr) {
				return &healthStatus{}, nil
			}
			return nil, err
		}
		switch h.Status {
		case argoUnknown, argoProgressing, argoSuspended, argoHealthy, argoDegraded, argoMissing:
			return h, nil
		}
		return &healthStatus{Status: argoUnknown, Message: invalidHealthStatus}, nil
	case lua.LTNil:
		return &healthStatus{}, nil
	}
	return nil, fmt.Errorf(incorrectReturnType, "table", ret.Type().String())
}

// decodeValue turns the object into Lua values as Argo CD's decodeValue does:
// maps become tables with string keys, slices tables with keys 1..n.
func decodeValue(l *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case json.Number:
		return lua.LString(v)
	case int:
		return lua.LNumber(v)
	case int32:
		return lua.LNumber(v)
	case int64:
		return lua.LNumber(v)
	case []any:
		arr := l.CreateTable(len(v), 0)
		for _, item := range v {
			arr.Append(decodeValue(l, item))
		}
		return arr
	case map[string]any:
		tbl := l.CreateTable(0, len(v))
		for key, item := range v {
			tbl.RawSetH(lua.LString(key), decodeValue(l, item))
		}
		return tbl
	}
	return lua.LNil
}

// openSafeOs reproduces Argo CD's OpenSafeOs exactly, including that it
// registers under the name of the *table* library, which is loaded already, so
// gopher-lua's RegisterModule returns it unchanged: the call opens nothing. In
// Argo's sandbox the global os stays nil (os.time() fails) and only
// require("os") returns the safe module; with open libraries the global os is
// gopher-lua's full one (os.execute included).
func openSafeOs(l *lua.LState) int {
	mod := l.RegisterModule(lua.TabLibName, safeOsFuncs)
	l.Push(mod)
	return 1
}

func safeOsLoader(l *lua.LState) int {
	mod := l.SetFuncs(l.NewTable(), safeOsFuncs)
	l.Push(mod)
	return 1
}

var safeOsFuncs = map[string]lua.LGFunction{
	"time": osTime,
	"date": osDate,
}

func osTime(l *lua.LState) int {
	if l.GetTop() == 0 {
		l.Push(lua.LNumber(time.Now().Unix()))
		return 1
	}
	tbl := l.CheckTable(1)
	t := time.Date(intField(tbl, "year", -1), time.Month(intField(tbl, "month", -1)), intField(tbl, "day", -1),
		intField(tbl, "hour", 12), intField(tbl, "min", 0), intField(tbl, "sec", 0), 0, time.Local)
	l.Push(lua.LNumber(t.Unix()))
	return 1
}

func intField(tb *lua.LTable, key string, def int) int {
	if n, ok := tb.RawGetString(key).(lua.LNumber); ok {
		return int(n)
	}
	return def
}

func osDate(l *lua.LState) int {
	t := time.Now()
	cfmt := "%c"
	if l.GetTop() >= 1 {
		cfmt = l.CheckString(1)
		if strings.HasPrefix(cfmt, "!") {
			t = time.Now().UTC()
			cfmt = strings.TrimLeft(cfmt, "!")
		}
		if l.GetTop() >= 2 {
			t = time.Unix(l.CheckInt64(2), 0)
		}
		if strings.HasPrefix(cfmt, "*t") {
			ret := l.NewTable()
			ret.RawSetString("year", lua.LNumber(t.Year()))
			ret.RawSetString("month", lua.LNumber(t.Month()))
			ret.RawSetString("day", lua.LNumber(t.Day()))
			ret.RawSetString("hour", lua.LNumber(t.Hour()))
			ret.RawSetString("min", lua.LNumber(t.Minute()))
			ret.RawSetString("sec", lua.LNumber(t.Second()))
			ret.RawSetString("wday", lua.LNumber(t.Weekday()+1))
			ret.RawSetString("yday", lua.LNumber(0))
			ret.RawSetString("isdst", lua.LFalse)
			l.Push(ret)
			return 1
		}
	}
	l.Push(lua.LString(strftime(t, cfmt)))
	return 1
}

var cDateFlagToGo = map[byte]string{
	'a': "mon", 'A': "Monday", 'b': "Jan", 'B': "January", 'c': "02 Jan 06 15:04 MST", 'd': "02",
	'F': "2006-01-02", 'H': "15", 'I': "03", 'm': "01", 'M': "04", 'p': "PM", 'P': "pm", 'S': "05",
	'x': "15/04/05", 'X': "15:04:05", 'y': "06", 'Y': "2006", 'z': "-0700", 'Z': "MST",
}

func strftime(t time.Time, cfmt string) string {
	var sc bytes.Buffer
	for i := 0; i < len(cfmt); i++ {
		c := cfmt[i]
		if c != '%' || i+1 >= len(cfmt) {
			sc.WriteByte(c)
			continue
		}
		i++
		if v, ok := cDateFlagToGo[cfmt[i]]; ok {
			sc.WriteString(t.Format(v))
		} else if cfmt[i] == '%' {
			sc.WriteByte('%')
		} else if cfmt[i] == 'w' {
			sc.WriteString(strconv.Itoa(int(t.Weekday())))
		} else {
			sc.WriteByte('%')
			sc.WriteByte(cfmt[i])
		}
	}
	return sc.String()
}
