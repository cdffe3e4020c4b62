// Command ferretdb runs FerretDB v1.24 (MongoDB wire protocol) on an SQLite
// backend, for local development and CI without Docker (see dev/stack).
//
// `go install github.com/FerretDB/FerretDB/cmd/ferretdb` builds a binary that
// panics at start (missing version.txt), so the library is embedded here.
//
//	ferretdb -listen 127.0.0.1:27117 -dir /abs/data/dir   # serve until SIGTERM/SIGINT
//	ferretdb -ping 127.0.0.1:27117                        # exit 0 if {ping:1} answers ok:1
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:27117", "TCP address to listen on")
	dir := flag.String("dir", "", "SQLite data directory (created if missing)")
	ping := flag.String("ping", "", "send a ping command to this address and exit (0 = ok)")
	timeout := flag.Duration("timeout", 2*time.Second, "timeout for -ping")
	debug := flag.Bool("debug", false, "debug logging")
	flag.Parse()

	if *ping != "" {
		if err := sendPing(*ping, *timeout); err != nil {
			fmt.Fprintln(os.Stderr, "ping:", err)
			os.Exit(1)
		}
		fmt.Println("ok")
		return
	}

	level := slog.LevelInfo
	if *debug {
		level = slog.LevelDebug
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	slog.SetDefault(logger)

	if *dir == "" {
		logger.Error("-dir is required")
		os.Exit(2)
	}
	abs, err := filepath.Abs(*dir)
	if err != nil {
		logger.Error("bad -dir", "err", err)
		os.Exit(2)
	}
	if err = os.MkdirAll(abs, 0o755); err != nil {
		logger.Error("cannot create -dir", "err", err)
		os.Exit(2)
	}

	f, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: *listen},
		Logger:    logger,
		Handler:   "sqlite",
		SQLiteURL: "file:" + abs + "/",
	})
	if err != nil {
		logger.Error("cannot start FerretDB", "err", err)
		os.Exit(1)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	logger.Info("FerretDB starting", "listen", *listen, "dir", abs)
	if err = f.Run(ctx); err != nil {
		logger.Error("FerretDB stopped with error", "err", err)
		os.Exit(1)
	}
	logger.Info("FerretDB stopped")
}

// sendPing sends OP_MSG {ping: 1, $db: "admin"} and checks the reply has ok: 1.
func sendPing(addr string, timeout time.Duration) error {
	conn, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))

	// BSON document {ping: int32(1), $db: "admin"}.
	var doc bytes.Buffer
	doc.WriteByte(0x10) // int32
	doc.WriteString("ping\x00")
	_ = binary.Write(&doc, binary.LittleEndian, int32(1))
	doc.WriteByte(0x02) // string
	doc.WriteString("$db\x00")
	_ = binary.Write(&doc, binary.LittleEndian, int32(len("admin")+1))
	doc.WriteString("admin\x00")
	doc.WriteByte(0x00)
	body := make([]byte, 4, 4+doc.Len())
	binary.LittleEndian.PutUint32(body, uint32(4+doc.Len()))
	body = append(body, doc.Bytes()...)

	// OP_MSG: header(len, requestID, responseTo, opCode=2013), flags, section kind 0, body.
	msg := make([]byte, 16+4+1, 16+4+1+len(body))
	binary.LittleEndian.PutUint32(msg[0:], uint32(16+4+1+len(body)))
	binary.LittleEndian.PutUint32(msg[4:], 1)
	binary.LittleEndian.PutUint32(msg[8:], 0)
	binary.LittleEndian.PutUint32(msg[12:], 2013)
	binary.LittleEndian.PutUint32(msg[16:], 0)
	msg[20] = 0
	msg = append(msg, body...)
	if _, err = conn.Write(msg); err != nil {
		return err
	}

	hdr := make([]byte, 16)
	if _, err = io.ReadFull(conn, hdr); err != nil {
		return err
	}
	n := binary.LittleEndian.Uint32(hdr[0:])
	if op := binary.LittleEndian.Uint32(hdr[12:]); op != 2013 {
		return fmt.Errorf("unexpected opCode %d", op)
	}
	if n < 16+4+1+5 || n > 16<<20 {
		return fmt.Errorf("bad reply length %d", n)
	}
	rest := make([]byte, n-16)
	if _, err = io.ReadFull(conn, rest); err != nil {
		return err
	}
	if rest[4] != 0 {
		return errors.New("unexpected reply section kind")
	}
	return checkOK(rest[5:])
}

// checkOK walks the top-level elements of a BSON document and requires ok == 1.
func checkOK(d []byte) error {
	if len(d) < 5 {
		return errors.New("short document")
	}
	end := int(binary.LittleEndian.Uint32(d))
	if end > len(d) {
		return errors.New("truncated document")
	}
	i := 4
	for i < end-1 {
		t := d[i]
		i++
		j := bytes.IndexByte(d[i:end], 0)
		if j < 0 {
			return errors.New("bad element name")
		}
		name := string(d[i : i+j])
		i += j + 1
		var size int
		var ok float64
		switch t {
		case 0x01: // double
			size = 8
			ok = math.Float64frombits(binary.LittleEndian.Uint64(d[i:]))
		case 0x10: // int32
			size = 4
			ok = float64(int32(binary.LittleEndian.Uint32(d[i:])))
		case 0x12, 0x09, 0x11: // int64, datetime, timestamp
			size = 8
			ok = float64(int64(binary.LittleEndian.Uint64(d[i:])))
		case 0x08: // bool
			size = 1
			if d[i] != 0 {
				ok = 1
			}
		case 0x02, 0x0D, 0x0E: // string, code, symbol
			size = 4 + int(binary.LittleEndian.Uint32(d[i:]))
		case 0x03, 0x04: // document, array
			size = int(binary.LittleEndian.Uint32(d[i:]))
		case 0x05: // binary
			size = 5 + int(binary.LittleEndian.Uint32(d[i:]))
		case 0x07: // ObjectId
			size = 12
		case 0x0A, 0x06, 0xFF, 0x7F: // null, undefined, min/max key
			size = 0
		case 0x13: // decimal128
			size = 16
		default:
			return fmt.Errorf("unsupported BSON type 0x%02x in reply", t)
		}
		if name == "ok" {
			if ok == 1 {
				return nil
			}
			return fmt.Errorf("ok=%v", ok)
		}
		i += size
	}
	return errors.New("no ok field in reply")
}
