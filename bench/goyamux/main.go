// goyamux: the Go peer of NOVA's benchmark, a reverse tunnel built the way
// frp's data path is (one TLS 1.3 connection from the agent to the server,
// one hashicorp/yamux session on it, one yamux stream per user connection),
// written for the benchmark only (see bench/README.md).
//
//	goyamux server -agent ADDR:PORT -route [BIND:]PORT=HOST:PORT ... [-window BYTES]
//	goyamux agent -server HOST:PORT -fingerprint sha256:HEX [-window BYTES]
//
// The server makes a throwaway self-signed certificate and prints its
// fingerprint; the agent dials the server, checks the certificate against
// the fingerprint, and runs the yamux client side.  For each connection to a
// route port the server opens a stream, writes the target address on it
// (two bytes of length, then "HOST:PORT"), and splices; the agent accepts the
// stream, dials the target and splices.  Both directions are copied
// independently, and an end of file on one side is passed on as a half-close
// (TCP shutdown, or a yamux FIN) on the other.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

// frp raises yamux's stream window from its default of 256 KiB to 6 MiB;
// this peer does the same by default.
const defaultWindow = 6 * 1024 * 1024

type routes []string

func (r *routes) String() string     { return strings.Join(*r, ",") }
func (r *routes) Set(v string) error { *r = append(*r, v); return nil }

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	if len(os.Args) < 2 {
		usage()
	}
	switch os.Args[1] {
	case "server":
		fs := flag.NewFlagSet("server", flag.ExitOnError)
		agentAddr := fs.String("agent", "127.0.0.1:0", "address to listen on for the agent (TLS)")
		window := fs.Uint("window", defaultWindow, "yamux MaxStreamWindowSize in bytes")
		var rs routes
		fs.Var(&rs, "route", "[BIND:]PORT=HOST:PORT: listen on BIND:PORT (default bind 127.0.0.1), reach HOST:PORT through the agent (repeatable)")
		_ = fs.Parse(os.Args[2:])
		if err := server(*agentAddr, rs, uint32(*window)); err != nil {
			log.Fatalf("server: %v", err)
		}
	case "agent":
		fs := flag.NewFlagSet("agent", flag.ExitOnError)
		serverAddr := fs.String("server", "", "HOST:PORT of the server")
		fingerprint := fs.String("fingerprint", "", "sha256:HEX of the server's certificate")
		window := fs.Uint("window", defaultWindow, "yamux MaxStreamWindowSize in bytes")
		_ = fs.Parse(os.Args[2:])
		if *serverAddr == "" || *fingerprint == "" {
			usage()
		}
		if err := agent(*serverAddr, *fingerprint, uint32(*window)); err != nil {
			log.Fatalf("agent: %v", err)
		}
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: goyamux server -agent ADDR:PORT -route [BIND:]PORT=HOST:PORT ... [-window BYTES]")
	fmt.Fprintln(os.Stderr, "       goyamux agent -server HOST:PORT -fingerprint sha256:HEX [-window BYTES]")
	os.Exit(2)
}

func yamuxConfig(window uint32) *yamux.Config {
	c := yamux.DefaultConfig()
	c.MaxStreamWindowSize = window
	c.AcceptBacklog = 4096
	c.LogOutput = io.Discard
	return c
}

// The server side.

type serverState struct {
	mu      sync.Mutex
	session *yamux.Session
}

func (s *serverState) current() *yamux.Session {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.session
}

func server(agentAddr string, rs routes, window uint32) error {
	cert, fingerprint, err := selfSigned()
	if err != nil {
		return err
	}
	conf := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}
	ln, err := tls.Listen("tcp", agentAddr, conf)
	if err != nil {
		return err
	}
	log.Printf("fingerprint %s", fingerprint)
	state := &serverState{}
	for _, r := range rs {
		listen, target, ok := strings.Cut(r, "=")
		if !ok {
			return fmt.Errorf("bad -route %q (want [BIND:]PORT=HOST:PORT)", r)
		}
		if !strings.Contains(listen, ":") {
			listen = "127.0.0.1:" + listen
		}
		if len(target) > 0xffff {
			return fmt.Errorf("target address too long: %q", target)
		}
		rl, err := net.Listen("tcp", listen)
		if err != nil {
			return err
		}
		log.Printf("route %s -> %s", rl.Addr(), target)
		go serveRoute(rl, target, state)
	}
	log.Printf("listening for the agent on %s", ln.Addr())
	for {
		conn, err := ln.Accept()
		if err != nil {
			return err
		}
		// Only a completed handshake replaces the session in use.
		tconn := conn.(*tls.Conn)
		tconn.SetDeadline(time.Now().Add(10 * time.Second))
		if err := tconn.Handshake(); err != nil {
			log.Printf("agent handshake from %s: %v", conn.RemoteAddr(), err)
			conn.Close()
			continue
		}
		tconn.SetDeadline(time.Time{})
		session, err := yamux.Server(conn, yamuxConfig(window))
		if err != nil {
			conn.Close()
			return err
		}
		state.mu.Lock()
		old := state.session
		state.session = session
		state.mu.Unlock()
		if old != nil {
			old.Close()
		}
		log.Printf("agent connected from %s", conn.RemoteAddr())
	}
}

func serveRoute(ln net.Listener, target string, state *serverState) {
	header := make([]byte, 2+len(target))
	binary.BigEndian.PutUint16(header, uint16(len(target)))
	copy(header[2:], target)
	for {
		user, err := ln.Accept()
		if err != nil {
			log.Printf("route %s: %v", ln.Addr(), err)
			return
		}
		go func() {
			session := state.current()
			if session == nil {
				user.Close()
				return
			}
			stream, err := session.OpenStream()
			if err != nil {
				user.Close()
				return
			}
			if _, err := stream.Write(header); err != nil {
				user.Close()
				stream.Close()
				return
			}
			splice(user.(*net.TCPConn), stream)
		}()
	}
}

// The agent side.

func agent(serverAddr, fingerprint string, window uint32) error {
	want := strings.TrimPrefix(fingerprint, "sha256:")
	if want == fingerprint {
		return fmt.Errorf("fingerprint must look like sha256:HEX")
	}
	conf := &tls.Config{
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true, // replaced by the fingerprint check below
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return errors.New("no server certificate")
			}
			sum := sha256.Sum256(raw[0])
			if hex.EncodeToString(sum[:]) != strings.ToLower(want) {
				return errors.New("server certificate does not match the fingerprint")
			}
			return nil
		},
	}
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", serverAddr, conf)
	if err != nil {
		return err
	}
	session, err := yamux.Client(conn, yamuxConfig(window))
	if err != nil {
		return err
	}
	log.Printf("connected to %s", serverAddr)
	for {
		stream, err := session.AcceptStream()
		if err != nil {
			return err
		}
		go func() {
			var size [2]byte
			if _, err := io.ReadFull(stream, size[:]); err != nil {
				stream.Close()
				return
			}
			target := make([]byte, binary.BigEndian.Uint16(size[:]))
			if _, err := io.ReadFull(stream, target); err != nil {
				stream.Close()
				return
			}
			dest, err := net.DialTimeout("tcp", string(target), 10*time.Second)
			if err != nil {
				log.Printf("dial %s: %v", target, err)
				stream.Close()
				return
			}
			splice(dest.(*net.TCPConn), stream)
		}()
	}
}

// Both ends.

// splice copies both ways between a TCP connection and a yamux stream.  An
// end of file is passed on as a half-close: yamux's Stream.Close sends FIN
// and keeps the stream readable until the peer's FIN.  Any other error closes
// both at once.
func splice(tcp *net.TCPConn, stream *yamux.Stream) {
	var once sync.Once
	abort := func() {
		once.Do(func() {
			tcp.Close()
			stream.Close()
		})
	}
	done := make(chan struct{}, 2)
	go func() {
		if _, err := io.Copy(stream, tcp); err != nil {
			abort()
		}
		stream.Close()
		done <- struct{}{}
	}()
	go func() {
		if _, err := io.Copy(tcp, stream); err != nil {
			abort()
		}
		tcp.CloseWrite()
		done <- struct{}{}
	}()
	<-done
	<-done
	tcp.Close()
	stream.Close()
}

func selfSigned() (tls.Certificate, string, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, "", err
	}
	template := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "goyamux-bench"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, "", err
	}
	sum := sha256.Sum256(der)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, "sha256:" + hex.EncodeToString(sum[:]), nil
}
